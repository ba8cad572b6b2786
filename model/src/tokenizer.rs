//! The tokenizer of a GGUF model, built from its metadata (GPT-2 style byte-level BPE), the chat
//! template, and an incremental detokenizer that never emits half a UTF-8 character.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::gguf::{get_string, get_usize};

/// GGUF token type of control tokens (`<|im_start|>` and the like).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of user-defined tokens, matched literally like control tokens.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer metadata key is missing or malformed.
    #[error("GGUF tokenizer metadata: {0}")]
    Metadata(String),
    /// The file uses a tokenizer model sovra does not implement.
    #[error("unsupported tokenizer model `{0}` (sovra reads gpt2-style byte-level BPE)")]
    UnsupportedModel(String),
    /// The BPE tokenizer refused to build or to encode.
    #[error("tokenizer: {0}")]
    Bpe(String),
    /// The prompt encodes to no token.
    #[error("the prompt is empty")]
    EmptyPrompt,
}

/// One turn of a conversation: who speaks (`system`, `user`, `assistant`) and what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatTurn {
    /// Who speaks.
    pub role: String,
    /// What they say.
    pub text: String,
}

impl ChatTurn {
    /// A turn of `role`.
    pub fn new(role: &str, text: &str) -> Self {
        Self {
            role: role.into(),
            text: text.into(),
        }
    }
}

/// A prompt and the chat wrapping asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatPrompt {
    /// The user's text.
    pub user: String,
    /// An optional system turn.
    pub system: Option<String>,
}

impl ChatPrompt {
    /// Its turns: the system's (if any), then the user's.
    pub fn turns(&self) -> Vec<ChatTurn> {
        let mut turns = Vec::new();
        if let Some(system) = &self.system {
            turns.push(ChatTurn::new("system", system));
        }
        turns.push(ChatTurn::new("user", &self.user));
        turns
    }

    /// The prompt in the model's chat template, ending where the assistant's answer starts.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(system) = &self.system {
            out.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
        }
        out.push_str(&format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            self.user
        ));
        out
    }
}

/// A model's tokenizer: encoding through the BPE, decoding through the byte-level table.
#[derive(Debug)]
pub struct ModelTokenizer {
    bpe: Tokenizer,
    /// The same BPE without the special tokens: text encoded with it never yields one.
    plain: Tokenizer,
    /// The chat layout's turn markers, when the vocabulary has them as special tokens.
    markers: Option<(u32, u32)>,
    /// Bytes of each token id.
    pieces: Vec<Vec<u8>>,
    eos: Option<u32>,
    bos: Option<u32>,
    add_bos: bool,
}

impl ModelTokenizer {
    /// Builds the tokenizer from GGUF metadata.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        let meta = |e: crate::LoadError| TokenizerError::Metadata(e.to_string());
        let model = get_string(md, "tokenizer.ggml.model").map_err(meta)?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model));
        }
        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        let merges = string_array(md, "tokenizer.ggml.merges")?;
        let types = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(values)) => values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let optional_id = |key: &str| {
            md.get(key)
                .map(|_| {
                    get_usize(md, key).and_then(|v| {
                        u32::try_from(v).map_err(|_| crate::LoadError::Metadata {
                            key: key.to_string(),
                            expected: "a token id",
                        })
                    })
                })
                .transpose()
                .map_err(meta)
        };
        let eos = optional_id("tokenizer.ggml.eos_token_id")?;
        let bos = optional_id("tokenizer.ggml.bos_token_id")?;
        let add_bos = matches!(
            md.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        Self::new(&tokens, &merges, &types, eos, bos, add_bos)
    }

    fn new(
        tokens: &[String],
        merges: &[String],
        types: &[i32],
        eos: Option<u32>,
        bos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self, TokenizerError> {
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| TokenizerError::Metadata(format!("merge `{m}` has no space")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Bpe(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        let special = |i: usize| {
            matches!(
                types.get(i),
                Some(&TOKEN_TYPE_CONTROL) | Some(&TOKEN_TYPE_USER_DEFINED)
            )
        };
        let specials: Vec<AddedToken> = (0..tokens.len())
            .filter(|&i| special(i))
            .map(|i| AddedToken::from(tokens[i].clone(), true))
            .collect();
        // Text matches the vocabulary's user-defined tokens as ordinary tokens (as llama.cpp
        // and the reference tokenizer do); only the control tokens are kept out of it.
        let mut plain = tokenizer.clone();
        let user_defined: Vec<AddedToken> = (0..tokens.len())
            .filter(|&i| types.get(i) == Some(&TOKEN_TYPE_USER_DEFINED))
            .map(|i| AddedToken::from(tokens[i].clone(), false))
            .collect();
        plain
            .add_tokens(user_defined)
            .map_err(|e| TokenizerError::Bpe(e.to_string()))?;
        let marker = |text: &str| {
            (0..tokens.len())
                .find(|&i| special(i) && tokens[i] == text)
                .map(|i| i as u32)
        };
        let markers = marker("<|im_start|>").zip(marker("<|im_end|>"));
        tokenizer
            .add_special_tokens(specials)
            .map_err(|e| TokenizerError::Bpe(e.to_string()))?;
        let table = byte_decoder();
        let pieces = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if special(i) {
                    t.as_bytes().to_vec()
                } else {
                    token_bytes(t, &table)
                }
            })
            .collect();
        for id in [eos, bos].into_iter().flatten() {
            if id as usize >= tokens.len() {
                return Err(TokenizerError::Metadata(format!(
                    "special token id {id} outside a vocabulary of {}",
                    tokens.len()
                )));
            }
        }
        Ok(Self {
            bpe: tokenizer,
            plain,
            markers,
            pieces,
            eos,
            bos,
            add_bos,
        })
    }

    /// Encodes `text`; special tokens written in it encode as those tokens. A BOS is added when
    /// the model asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .bpe
            .encode(text, false)
            .map_err(|e| TokenizerError::Bpe(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        if ids.is_empty() {
            return Err(TokenizerError::EmptyPrompt);
        }
        Ok(ids)
    }

    /// Encodes a conversation in the chat layout, ending where the assistant's answer starts.
    /// The turn markers are added as their tokens; what the turns say is encoded as text only,
    /// so a turn that spells a special token (a marker, an end of text) cannot make one. For
    /// text without special tokens this gives the tokens of [`ChatPrompt::render`] encoded
    /// with [`Self::encode`].
    pub fn encode_chat(&self, turns: &[ChatTurn]) -> Result<Vec<u32>, TokenizerError> {
        let (start, end) = self.markers.ok_or_else(|| {
            TokenizerError::Metadata(
                "the vocabulary has no <|im_start|> and <|im_end|> tokens for the chat layout"
                    .into(),
            )
        })?;
        if turns.is_empty() {
            return Err(TokenizerError::EmptyPrompt);
        }
        let plain = |text: &str| -> Result<Vec<u32>, TokenizerError> {
            Ok(self
                .plain
                .encode(text, false)
                .map_err(|e| TokenizerError::Bpe(e.to_string()))?
                .get_ids()
                .to_vec())
        };
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        for turn in turns {
            ids.push(start);
            ids.extend(plain(&format!("{}\n{}", turn.role, turn.text))?);
            ids.push(end);
            ids.extend(plain("\n")?);
        }
        ids.push(start);
        ids.extend(plain("assistant\n")?);
        Ok(ids)
    }

    /// The end-of-sequence token, if the model names one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The bytes token `id` stands for (empty for an unknown id).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Decodes a whole sequence (invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_bytes(id))
            .copied()
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Turns a stream of token ids into text, holding back bytes until they form whole characters.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the bytes of `id` and returns the text that is now complete.
    pub fn push(&mut self, tokenizer: &ModelTokenizer, id: u32) -> String {
        self.pending.extend_from_slice(tokenizer.token_bytes(id));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still pending at the end of the stream (incomplete bytes become U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

fn string_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, TokenizerError> {
    match md.get(key) {
        Some(Value::Array(values)) => values
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(TokenizerError::Metadata(format!(
                    "`{key}` holds a non-string"
                ))),
            })
            .collect(),
        _ => Err(TokenizerError::Metadata(format!(
            "`{key}` is missing or not an array"
        ))),
    }
}

/// GPT-2's map from the printable characters of byte-level BPE back to bytes.
fn byte_decoder() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut table = HashMap::with_capacity(256);
    let mut extra = 0;
    for byte in 0u32..256 {
        let ch = if printable.contains(&byte) {
            byte
        } else {
            extra += 1;
            255 + extra
        };
        table.insert(char::from_u32(ch).expect("valid char"), byte as u8);
    }
    table
}

fn token_bytes(token: &str, table: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len());
    for ch in token.chars() {
        match table.get(&ch) {
            Some(&b) => out.push(b),
            None => out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelTokenizer {
        // Bytes "é" = C3 A9 map to the printable chars 'Ã' and '©'.
        let tokens: Vec<String> = ["<|end|>", "a", "b", "ab", "Ã", "©", "Ġ", "Ġa"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let merges = vec!["a b".to_string(), "Ġ a".to_string()];
        let types = vec![3, 1, 1, 1, 1, 1, 1, 1];
        ModelTokenizer::new(&tokens, &merges, &types, Some(0), None, false).unwrap()
    }

    #[test]
    fn encodes_special_tokens_written_in_text() {
        let t = tiny();
        assert_eq!(t.encode("ab a<|end|>").unwrap(), vec![3, 7, 0]);
        assert_eq!(t.decode(&[3, 7, 0]), "ab a<|end|>");
    }

    #[test]
    fn incremental_decoding_never_splits_a_character() {
        let t = tiny();
        let mut d = IncrementalDecoder::new();
        assert_eq!(d.push(&t, 1), "a");
        assert_eq!(d.push(&t, 4), "", "first byte of é is held back");
        assert_eq!(d.push(&t, 5), "é");
        assert_eq!(
            d.push(&t, 5),
            "\u{FFFD}",
            "a lone continuation byte is replaced"
        );
        assert_eq!(d.push(&t, 4), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }

    #[test]
    fn a_token_id_beyond_32_bits_is_refused_not_wrapped() {
        let mut md = HashMap::new();
        md.insert(
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        );
        let strings =
            |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
        md.insert(
            "tokenizer.ggml.tokens".to_string(),
            strings(&["a", "b", "ab"]),
        );
        md.insert("tokenizer.ggml.merges".to_string(), strings(&["a b"]));
        md.insert(
            "tokenizer.ggml.eos_token_id".to_string(),
            Value::U64(1 << 32),
        );
        let err = ModelTokenizer::from_gguf(&md).unwrap_err().to_string();
        assert!(
            err.contains("eos_token_id") && err.contains("token id"),
            "{err}"
        );
        md.insert("tokenizer.ggml.eos_token_id".to_string(), Value::U64(2));
        assert_eq!(ModelTokenizer::from_gguf(&md).unwrap().eos(), Some(2));
    }

    #[test]
    fn chat_turns_keep_user_defined_tokens_but_make_no_control_token() {
        // Byte-level pieces of every character used, the two markers and an end token
        // (control, type 3), and a user-defined token (type 4).
        let mut tokens: Vec<String> = ["<|im_start|>", "<|im_end|>", "<|end|>", "<think>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut types = vec![3, 3, 3, 4];
        for c in "userassistantxyhkd<|>Ċ".chars() {
            if !tokens.contains(&c.to_string()) {
                tokens.push(c.to_string());
                types.push(1);
            }
        }
        let t = ModelTokenizer::new(&tokens, &[], &types, None, None, false).unwrap();
        let ids = t
            .encode_chat(&[ChatTurn::new("user", "x<think>y<|end|>")])
            .unwrap();
        let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
        assert!(ids.contains(&id("<think>")), "{ids:?}");
        assert!(!ids.contains(&id("<|end|>")), "{ids:?}");
        assert_eq!(ids.iter().filter(|&&i| i == id("<|im_start|>")).count(), 2);
        assert_eq!(
            t.decode(&ids),
            "<|im_start|>user\nx<think>y<|end|><|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn empty_prompt_is_refused() {
        assert!(matches!(
            tiny().encode(""),
            Err(TokenizerError::EmptyPrompt)
        ));
    }

    #[test]
    fn chat_template_matches_reference_layout() {
        let p = ChatPrompt {
            user: "Hi".into(),
            system: None,
        };
        assert_eq!(
            p.render(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let p = ChatPrompt {
            user: "Hi".into(),
            system: Some("Be brief.".into()),
        };
        assert!(
            p.render()
                .starts_with("<|im_start|>system\nBe brief.<|im_end|>\n")
        );
    }
}
