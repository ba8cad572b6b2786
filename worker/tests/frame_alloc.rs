//! `read_frame` must refuse oversized declarations before allocating, and
//! must grow its buffer only with the bytes actually received. This test
//! binary counts allocations with its own global allocator, so it holds a
//! single test (nothing else allocates concurrently).

use std::alloc::{GlobalAlloc, Layout, System};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use sovra_worker::frame::{Frame, FrameError, MAX_FRAME_BYTES, read_frame};

/// Wraps the system allocator and remembers the largest single request.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::SeqCst);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::SeqCst);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Largest = Largest;

/// Runs `read_frame` on an in-memory buffer (which never blocks), and
/// returns its result with the largest allocation made meanwhile.
fn read_measured(mut bytes: &[u8]) -> (Result<Option<Frame>, FrameError>, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    let mut fut = pin!(read_frame(&mut bytes));
    let result = match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("reading from a slice never blocks"),
    };
    (result, LARGEST.load(Ordering::SeqCst))
}

#[test]
fn declared_length_never_drives_allocation() {
    // A frame declaring 4 GiB: refused before any allocation for it.
    let mut four_gib = u32::MAX.to_le_bytes().to_vec();
    four_gib.extend_from_slice(b"SVF1");
    let (result, largest) = read_measured(&four_gib);
    assert_eq!(
        result,
        Err(FrameError::TooLarge {
            declared: u64::from(u32::MAX),
            max: MAX_FRAME_BYTES
        })
    );
    assert!(largest < 4096, "allocated {largest} bytes");

    // The largest allowed declaration followed by 100 bytes: the buffer
    // stays at the first 64 KiB chunk, not the declared 64 MiB.
    // (One row of (64 MiB - 27) / 4 values: the fields agree with the declared length.)
    let hidden = (MAX_FRAME_BYTES - 27) / 4;
    let mut short = (27 + hidden * 4).to_le_bytes().to_vec();
    short.extend_from_slice(b"SVF1\x01");
    short.extend_from_slice(&7u64.to_le_bytes());
    short.extend_from_slice(&0u32.to_le_bytes());
    short.extend_from_slice(&1u32.to_le_bytes());
    short.extend_from_slice(&hidden.to_le_bytes());
    short.extend_from_slice(&[0, 1]);
    short.resize(104, 0);
    let (result, largest) = read_measured(&short);
    assert!(matches!(
        result,
        Err(FrameError::Truncated { got: 104, .. })
    ));
    assert!(largest <= 64 << 10, "allocated {largest} bytes");
}
