//! The data-plane wire format: the frames neighbouring workers exchange.
//!
//! A worker that runs a slice of the transformer sends the hidden states it
//! produced to the worker running the next slice ([`Frame::Activations`]),
//! and the tail worker sends each sampled token back to the head
//! ([`Frame::Token`]). Frames travel in order on a QUIC stream (see
//! `docs/protocol.md`).
//!
//! On the wire a frame is a `u32` little-endian body length followed by the
//! body. Body layout (all integers little-endian):
//!
//! | field     | bytes | meaning                                      |
//! |-----------|-------|----------------------------------------------|
//! | magic     | 4     | `SVF1`                                       |
//! | kind      | 1     | 1 = activations, 2 = token                   |
//!
//! Activations continue with `session u64, start_pos u32, rows u32,
//! hidden u32, flags u8 (bit 0 = sample, other bits 0), dtype u8 (1 = f32)`
//! and `rows * hidden` f32 values (row-major, all finite). A token continues
//! with `session u64, position u32, token u32`.
//!
//! Every input is untrusted: decoding never panics, refuses a frame larger
//! than [`MAX_FRAME_BYTES`] before allocating for it, and never allocates
//! more than the declared (bounded) length.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Most bytes one frame may declare; larger frames are refused before any allocation.
pub const MAX_FRAME_BYTES: u32 = 64 << 20;
/// The four bytes every frame body starts with.
pub const MAGIC: [u8; 4] = *b"SVF1";

const KIND_ACTIVATIONS: u8 = 1;
const KIND_TOKEN: u8 = 2;
const DTYPE_F32: u8 = 1;
const FLAG_SAMPLE: u8 = 1;
/// Bytes of an activations body before its payload.
const ACTIVATIONS_HEADER_BYTES: usize = 4 + 1 + 8 + 4 + 4 + 4 + 1 + 1;
/// Bytes of a whole token body.
const TOKEN_BODY_BYTES: usize = 4 + 1 + 8 + 4 + 4;
/// Bytes of the length prefix.
const PREFIX_BYTES: usize = 4;
/// Bytes at the start of every body that say what the frame is: magic, kind, session.
const HEAD_BYTES: usize = 4 + 1 + 8;
/// First read buffer for a body; it then doubles, capped at the declared length.
const FIRST_CHUNK: usize = 64 << 10;

/// One data-plane message.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Hidden states for the next stage: `rows` consecutive positions of one
    /// session starting at `start_pos`, f32 row-major `[rows, hidden]`.
    /// `sample` tells the tail to sample after the last row (false for
    /// non-final prefill chunks).
    Activations {
        /// The session (one generation request) the rows belong to.
        session: u64,
        /// Position of the first row in the session's sequence.
        start_pos: u32,
        /// Number of positions (at least 1).
        rows: u32,
        /// Hidden size: values per row (at least 1).
        hidden: u32,
        /// Whether the tail samples a token after the last row.
        sample: bool,
        /// `rows * hidden` finite values, row-major.
        data: Vec<f32>,
    },
    /// The token the tail sampled at `position`, sent back to the head.
    Token {
        /// The session the token belongs to.
        session: u64,
        /// Position of the sampled token in the session's sequence.
        position: u32,
        /// The token id.
        token: u32,
    },
}

/// Why a frame was refused (decoding, reading or writing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame declares (or would need) more bytes than allowed.
    #[error("frame of {declared} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Bytes declared by the length prefix (or needed by the frame).
        declared: u64,
        /// The limit, [`MAX_FRAME_BYTES`].
        max: u32,
    },
    /// The input ended before the frame did.
    #[error("frame truncated: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes needed to read the next field (or the whole frame).
        needed: u64,
        /// Bytes actually available.
        got: u64,
    },
    /// The body does not start with [`MAGIC`].
    #[error("frame body does not start with the magic \"SVF1\"")]
    BadMagic,
    /// The kind byte is neither 1 (activations) nor 2 (token).
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The flags byte of an activations frame has bits other than bit 0 set.
    #[error("unknown activation flags {0:#04x} (only bit 0, sample, is defined)")]
    UnknownFlags(u8),
    /// The dtype byte of an activations frame is not 1 (f32).
    #[error("unknown activation dtype {0} (only 1 = f32 is defined)")]
    UnknownDtype(u8),
    /// An activations frame declares zero rows or a zero hidden size.
    #[error("activations frame declares zero rows or a zero hidden size")]
    ZeroRows,
    /// The payload size is not `rows * hidden * 4` bytes (too short, the
    /// product overflows, or the data length does not match the shape).
    #[error("activations shape {rows}x{hidden} does not match a payload of {payload_bytes} bytes")]
    ShapeMismatch {
        /// Declared rows.
        rows: u32,
        /// Declared hidden size.
        hidden: u32,
        /// Payload bytes actually present.
        payload_bytes: u64,
    },
    /// An activation value is NaN or infinite.
    #[error("activation value {index} is not finite")]
    NonFinite {
        /// Index of the first non-finite value in the row-major data.
        index: usize,
    },
    /// The body continues after the frame's last field.
    #[error("{0} unexpected bytes after the end of the frame")]
    TrailingBytes(usize),
    /// The rest of a frame's head did not arrive within the time allowed once its first
    /// byte had.
    #[error("the rest of a frame's head did not arrive within {0:?}")]
    Stalled(std::time::Duration),
    /// A token frame declares a body of other than 21 bytes.
    #[error("a token frame's body is 21 bytes, not {0}")]
    TokenLength(u32),
    /// The underlying stream failed.
    #[error("frame I/O failed: {0}")]
    Io(String),
}

impl Frame {
    /// The session the frame belongs to.
    pub fn session(&self) -> u64 {
        match self {
            Frame::Activations { session, .. } | Frame::Token { session, .. } => *session,
        }
    }
}

/// Encodes `frame` completely: the `u32` little-endian body length, then
/// the body. Encoding does not validate: a frame that [`validate`] refuses
/// encodes to bytes the decoder refuses ([`write_frame`] validates first).
pub fn encode(frame: &Frame) -> Vec<u8> {
    let body_len = body_len(frame);
    let mut out = Vec::with_capacity(PREFIX_BYTES.saturating_add(body_len));
    let declared = u32::try_from(body_len).unwrap_or(u32::MAX);
    out.extend_from_slice(&declared.to_le_bytes());
    out.extend_from_slice(&MAGIC);
    match frame {
        Frame::Activations {
            session,
            start_pos,
            rows,
            hidden,
            sample,
            data,
        } => {
            out.push(KIND_ACTIVATIONS);
            out.extend_from_slice(&session.to_le_bytes());
            out.extend_from_slice(&start_pos.to_le_bytes());
            out.extend_from_slice(&rows.to_le_bytes());
            out.extend_from_slice(&hidden.to_le_bytes());
            out.push(if *sample { FLAG_SAMPLE } else { 0 });
            out.push(DTYPE_F32);
            for value in data {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
        Frame::Token {
            session,
            position,
            token,
        } => {
            out.push(KIND_TOKEN);
            out.extend_from_slice(&session.to_le_bytes());
            out.extend_from_slice(&position.to_le_bytes());
            out.extend_from_slice(&token.to_le_bytes());
        }
    }
    out
}

/// Checks that `frame` would decode back to itself: rows and hidden at
/// least 1, `data.len() == rows * hidden`, every value finite, and the body
/// at most [`MAX_FRAME_BYTES`].
pub fn validate(frame: &Frame) -> Result<(), FrameError> {
    let Frame::Activations {
        rows, hidden, data, ..
    } = frame
    else {
        return Ok(());
    };
    if *rows == 0 || *hidden == 0 {
        return Err(FrameError::ZeroRows);
    }
    let body = body_len(frame) as u64;
    if body > u64::from(MAX_FRAME_BYTES) {
        return Err(FrameError::TooLarge {
            declared: body,
            max: MAX_FRAME_BYTES,
        });
    }
    let expected = u64::from(*rows) * u64::from(*hidden);
    if expected != data.len() as u64 {
        return Err(FrameError::ShapeMismatch {
            rows: *rows,
            hidden: *hidden,
            payload_bytes: (data.len() as u64).saturating_mul(4),
        });
    }
    check_finite(data)
}

/// Decodes one frame body (without its length prefix). `body` must hold
/// exactly one frame: extra bytes are [`FrameError::TrailingBytes`].
pub fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
    if body.len() as u64 > u64::from(MAX_FRAME_BYTES) {
        return Err(FrameError::TooLarge {
            declared: body.len() as u64,
            max: MAX_FRAME_BYTES,
        });
    }
    let mut cur = Cursor { buf: body, pos: 0 };
    if cur.take(MAGIC.len())? != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let frame = match cur.u8()? {
        KIND_ACTIVATIONS => decode_activations(&mut cur)?,
        KIND_TOKEN => Frame::Token {
            session: cur.u64()?,
            position: cur.u32()?,
            token: cur.u32()?,
        },
        other => return Err(FrameError::UnknownKind(other)),
    };
    match cur.remaining() {
        0 => Ok(frame),
        extra => Err(FrameError::TrailingBytes(extra)),
    }
}

/// Reads one frame. Returns `Ok(None)` on a clean end of stream before a
/// frame starts; an end of stream inside a frame is
/// [`FrameError::Truncated`]. A declared length over [`MAX_FRAME_BYTES`] is
/// refused before any allocation, and the body buffer grows with the bytes
/// actually received, never beyond the declared length.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    match read_head(r).await? {
        Some(head) => read_rest(r, &head).await.map(Some),
        None => Ok(None),
    }
}

/// The start of a frame, read ahead of its payload so a receiver can route it and make room
/// for it before reading the rest ([`read_head`], then [`read_rest`] or [`skip_rest`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHead {
    declared: u32,
    /// The body's first bytes: a token's magic, kind and session; all of an activations
    /// frame's fields before its payload.
    head: [u8; ACTIVATIONS_HEADER_BYTES],
}

impl FrameHead {
    /// The session the frame belongs to.
    pub fn session(&self) -> u64 {
        let mut session = [0u8; 8];
        session.copy_from_slice(&self.head[5..HEAD_BYTES]);
        u64::from_le_bytes(session)
    }

    /// Whether the frame is a token (otherwise activations).
    pub fn is_token(&self) -> bool {
        self.head[4] == KIND_TOKEN
    }

    /// Body bytes the frame declares (equal to [`body_len`] of the frame it decodes to).
    pub fn body_len(&self) -> usize {
        self.declared as usize
    }

    /// The body's bytes read so far.
    fn bytes(&self) -> &[u8] {
        &self.head[..head_len(self.head[MAGIC.len()])]
    }
}

/// Reads a frame's length prefix and the start of its body, and checks everything but the
/// payload's values before the rest is read: the declared length (at most
/// [`MAX_FRAME_BYTES`], and exactly what the frame's kind and shape need), the magic, the
/// kind, and an activations frame's flags, dtype and shape. Returns `Ok(None)` on a clean end
/// of stream before a frame starts.
pub async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<FrameHead>, FrameError> {
    match first_byte(r).await? {
        Some(first) => head_after(r, first).await.map(Some),
        None => Ok(None),
    }
}

/// As [`read_head`], but once the frame's first byte has arrived (a stream may be quiet
/// between frames for as long as it likes), the rest of the head must arrive within `limit`
/// ([`FrameError::Stalled`] otherwise).
pub async fn read_head_within<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: std::time::Duration,
) -> Result<Option<FrameHead>, FrameError> {
    let Some(first) = first_byte(r).await? else {
        return Ok(None);
    };
    match tokio::time::timeout(limit, head_after(r, first)).await {
        Ok(head) => head.map(Some),
        Err(_) => Err(FrameError::Stalled(limit)),
    }
}

/// The first byte of the next frame, or `None` at a clean end of stream.
async fn first_byte<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<u8>, FrameError> {
    let mut first = [0u8; 1];
    Ok((read_full(r, &mut first).await? == 1).then_some(first[0]))
}

/// The rest of a head whose first byte was `first`; each field is checked as soon as it has
/// been read.
async fn head_after<R: AsyncRead + Unpin>(r: &mut R, first: u8) -> Result<FrameHead, FrameError> {
    let mut prefix = [first, 0, 0, 0];
    let got = 1 + read_full(r, &mut prefix[1..]).await?;
    if got < PREFIX_BYTES {
        return Err(FrameError::Truncated {
            needed: PREFIX_BYTES as u64,
            got: got as u64,
        });
    }
    let declared = u32::from_le_bytes(prefix);
    if declared > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            declared: u64::from(declared),
            max: MAX_FRAME_BYTES,
        });
    }
    let len = declared as usize;
    let kind_end = MAGIC.len() + 1;
    if len < kind_end {
        // Too short for any frame: read what it declares and report why it does not decode.
        return Err(short_body_error(&read_body(r, len, &[]).await?, HEAD_BYTES));
    }
    let mut head = FrameHead {
        declared,
        head: [0; ACTIVATIONS_HEADER_BYTES],
    };
    read_exact_of(r, &mut head.head[..kind_end], 0, len).await?;
    if head.head[..MAGIC.len()] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let kind = head.head[MAGIC.len()];
    match kind {
        KIND_TOKEN if len == TOKEN_BODY_BYTES => {}
        KIND_TOKEN => return Err(FrameError::TokenLength(declared)),
        KIND_ACTIVATIONS if len >= ACTIVATIONS_HEADER_BYTES => {}
        KIND_ACTIVATIONS => {
            // Read what it declares: the decoder names the field it cuts short.
            let body = read_body(r, len, &head.head[..kind_end]).await?;
            return Err(short_body_error(&body, ACTIVATIONS_HEADER_BYTES));
        }
        other => return Err(FrameError::UnknownKind(other)),
    }
    let end = head_len(kind);
    read_exact_of(r, &mut head.head[kind_end..end], kind_end, len).await?;
    if kind == KIND_ACTIVATIONS {
        let mut cur = Cursor {
            buf: &head.head[kind_end..end],
            pos: 0,
        };
        let (_, _, rows, hidden, _) = activations_fields(&mut cur)?;
        payload_fits(rows, hidden, len - ACTIVATIONS_HEADER_BYTES)?;
    }
    Ok(head)
}

/// Bytes of a head of `kind` (a known one): a token's magic, kind and session; all of an
/// activations frame's fields.
fn head_len(kind: u8) -> usize {
    if kind == KIND_TOKEN {
        HEAD_BYTES
    } else {
        ACTIVATIONS_HEADER_BYTES
    }
}

/// Why `body`, shorter than the `needed` bytes its frame's fields take, is refused: the
/// decoder's error (it names the field cut short).
fn short_body_error(body: &[u8], needed: usize) -> FrameError {
    match decode_body(body) {
        Err(e) => e,
        Ok(_) => FrameError::Truncated {
            needed: needed as u64,
            got: body.len() as u64,
        },
    }
}

/// Fills `buf`, the body's bytes from `at` on, of a body of `len` bytes.
async fn read_exact_of<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    at: usize,
    len: usize,
) -> Result<(), FrameError> {
    let got = read_full(r, buf).await?;
    if got < buf.len() {
        return Err(FrameError::Truncated {
            needed: (PREFIX_BYTES + len) as u64,
            got: (PREFIX_BYTES + at + got) as u64,
        });
    }
    Ok(())
}

/// Reads the rest of the frame that `head` starts and decodes the whole frame.
pub async fn read_rest<R: AsyncRead + Unpin>(
    r: &mut R,
    head: &FrameHead,
) -> Result<Frame, FrameError> {
    let body = read_body(r, head.body_len(), head.bytes()).await?;
    decode_body(&body)
}

/// Reads the rest of the frame that `head` starts and throws it away, holding at most 64 KiB
/// of it at a time.
pub async fn skip_rest<R: AsyncRead + Unpin>(
    r: &mut R,
    head: &FrameHead,
) -> Result<(), FrameError> {
    let mut left = head.body_len() - head.bytes().len();
    let mut chunk = vec![0u8; left.min(FIRST_CHUNK)];
    while left > 0 {
        let want = left.min(chunk.len());
        let got = read_full(r, &mut chunk[..want]).await?;
        left -= got;
        if got < want {
            return Err(FrameError::Truncated {
                needed: (PREFIX_BYTES + head.body_len()) as u64,
                got: (PREFIX_BYTES + head.body_len() - left) as u64,
            });
        }
    }
    Ok(())
}

/// Validates `frame` (see [`validate`]), then writes it and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), FrameError> {
    validate(frame)?;
    let bytes = encode(frame);
    w.write_all(&bytes).await.map_err(io_err)?;
    w.flush().await.map_err(io_err)
}

/// Body bytes of `frame` (saturating; only huge invalid frames saturate).
pub fn body_len(frame: &Frame) -> usize {
    match frame {
        Frame::Activations { data, .. } => {
            ACTIVATIONS_HEADER_BYTES.saturating_add(data.len().saturating_mul(4))
        }
        Frame::Token { .. } => TOKEN_BODY_BYTES,
    }
}

/// The activations fields after the kind byte.
fn decode_activations(cur: &mut Cursor<'_>) -> Result<Frame, FrameError> {
    let (session, start_pos, rows, hidden, sample) = activations_fields(cur)?;
    let needed = payload_fits(rows, hidden, cur.remaining())?;
    let data = decode_f32s(cur.take(needed)?)?;
    Ok(Frame::Activations {
        session,
        start_pos,
        rows,
        hidden,
        sample,
        data,
    })
}

/// Reads and checks an activations frame's fields after its kind byte (session, start
/// position, rows, hidden size, flags, dtype); returns session, start position, rows, hidden
/// size and the sample flag.
fn activations_fields(cur: &mut Cursor<'_>) -> Result<(u64, u32, u32, u32, bool), FrameError> {
    let session = cur.u64()?;
    let start_pos = cur.u32()?;
    let rows = cur.u32()?;
    let hidden = cur.u32()?;
    let flags = cur.u8()?;
    if flags & !FLAG_SAMPLE != 0 {
        return Err(FrameError::UnknownFlags(flags));
    }
    let dtype = cur.u8()?;
    if dtype != DTYPE_F32 {
        return Err(FrameError::UnknownDtype(dtype));
    }
    if rows == 0 || hidden == 0 {
        return Err(FrameError::ZeroRows);
    }
    Ok((session, start_pos, rows, hidden, flags & FLAG_SAMPLE != 0))
}

/// Checks that `available` payload bytes hold exactly `rows × hidden` f32 values (computed
/// without overflow); returns the payload's size.
fn payload_fits(rows: u32, hidden: u32, available: usize) -> Result<usize, FrameError> {
    let needed = (rows as usize)
        .checked_mul(hidden as usize)
        .and_then(|n| n.checked_mul(4));
    match needed {
        Some(n) if n == available => Ok(n),
        Some(n) if n < available => Err(FrameError::TrailingBytes(available - n)),
        _ => Err(FrameError::ShapeMismatch {
            rows,
            hidden,
            payload_bytes: available as u64,
        }),
    }
}

/// Little-endian f32s; `bytes.len()` is a multiple of 4. Refuses non-finite values.
fn decode_f32s(bytes: &[u8]) -> Result<Vec<f32>, FrameError> {
    let mut data = Vec::with_capacity(bytes.len() / 4);
    for (index, chunk) in bytes.chunks_exact(4).enumerate() {
        let value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if !value.is_finite() {
            return Err(FrameError::NonFinite { index });
        }
        data.push(value);
    }
    Ok(data)
}

fn check_finite(data: &[f32]) -> Result<(), FrameError> {
    match data.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(FrameError::NonFinite { index }),
        None => Ok(()),
    }
}

/// Reads the rest of a body of exactly `len` bytes whose first bytes, `start`, were read
/// already, growing the buffer (doubling, capped at `len`) only as bytes arrive.
async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    start: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let mut body = start.to_vec();
    while body.len() < len {
        let target = len.min(FIRST_CHUNK.max(body.len().saturating_mul(2)));
        let start = body.len();
        body.reserve_exact(target - start);
        body.resize(target, 0);
        let got = read_full(r, &mut body[start..]).await?;
        if start + got < target {
            return Err(FrameError::Truncated {
                needed: (PREFIX_BYTES + len) as u64,
                got: (PREFIX_BYTES + start + got) as u64,
            });
        }
    }
    Ok(body)
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(filled)
}

fn io_err(e: std::io::Error) -> FrameError {
    FrameError::Io(e.to_string())
}

/// Bounds-checked reading of a frame body.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.buf.len());
        let Some(end) = end else {
            return Err(FrameError::Truncated {
                needed: (self.pos as u64).saturating_add(n as u64),
                got: self.buf.len() as u64,
            });
        };
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
