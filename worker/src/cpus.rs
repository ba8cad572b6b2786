//! Pinning a worker's compute threads to cores, one thread per core.
//!
//! A forward runs on the calling thread and candle's barrier-pool threads, which meet at a
//! barrier after every op. Left to the scheduler, a pool thread woken for the next op is often
//! placed on the core of the thread that woke it and preempts it, while the other core idles;
//! the op then waits for both. Pinned one per core, they never share one. Measured on the
//! two-core demo host (3 workers taking turns on the same two cores): 3-stage q8_0 decode
//! ~15 % faster (see docs/benchmarks.md).

use std::collections::BTreeSet;

/// Highest core number + 1 that a core list may name (the size of Linux's `cpu_set_t`).
const MAX_CORES: usize = 1024;

/// Parses a core list such as `0-3,8` (ranges and single cores, comma-separated).
pub fn parse_core_list(text: &str) -> Result<Vec<usize>, String> {
    let mut cores = Vec::new();
    let mut seen = BTreeSet::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!("core list `{text}` has an empty entry"));
        }
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}` in core list `{text}` is not a core number"))
        };
        let (start, end) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(part)?, number(part)?),
        };
        if start > end {
            return Err(format!("core range `{part}` runs backwards"));
        }
        if end >= MAX_CORES {
            return Err(format!(
                "core {end} is beyond the {MAX_CORES} a core list can name"
            ));
        }
        for core in start..=end {
            if !seen.insert(core) {
                return Err(format!("core {core} appears twice in `{text}`"));
            }
            cores.push(core);
        }
    }
    Ok(cores)
}

pub use imp::{allowed_cores, pin_current_thread};

#[cfg(target_os = "linux")]
mod imp {
    /// The cores the calling thread may run on (at start, those of the process).
    pub fn allowed_cores() -> std::io::Result<Vec<usize>> {
        // Safety: a zeroed cpu_set_t is a valid empty set; the kernel writes at most its size.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((0..super::MAX_CORES.min(libc::CPU_SETSIZE as usize))
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect())
    }

    /// Pins the calling thread to `core`.
    pub fn pin_current_thread(core: usize) -> std::io::Result<()> {
        if core >= super::MAX_CORES.min(libc::CPU_SETSIZE as usize) {
            return Err(std::io::Error::other(format!("core {core} out of range")));
        }
        // Safety: a zeroed cpu_set_t is a valid empty set, `core` is within its bounds.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(core, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    fn unsupported() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "pinning threads to cores is supported on Linux only",
        )
    }

    /// The cores the calling thread may run on: not known on this system.
    pub fn allowed_cores() -> std::io::Result<Vec<usize>> {
        Err(unsupported())
    }

    /// Pins the calling thread to `core`: not supported on this system.
    pub fn pin_current_thread(_core: usize) -> std::io::Result<()> {
        Err(unsupported())
    }
}

/// Checks that every core of `cores` is one this process may run on.
pub fn check_available(cores: &[usize]) -> Result<(), String> {
    let allowed = allowed_cores().map_err(|e| format!("reading the usable cores: {e}"))?;
    if let Some(core) = cores.iter().find(|c| !allowed.contains(c)) {
        return Err(format!(
            "core {core} is not available to this process (available: {})",
            format_core_list(&allowed)
        ));
    }
    Ok(())
}

/// `0-3,8` for `[0, 1, 2, 3, 8]`.
pub fn format_core_list(cores: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cores.len() {
        let mut j = i;
        while j + 1 < cores.len() && cores[j + 1] == cores[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cores[i].to_string()
        } else {
            format!("{}-{}", cores[i], cores[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Pins the calling thread (the one that will run forwards) to `cores[0]` and each of candle's
/// barrier-pool threads to one of the others. `cores` must hold one core per compute thread.
pub fn pin_compute_threads(cores: &[usize]) -> Result<(), String> {
    let pool = candle_core::utils::barrier_pool();
    let workers = pool.n_workers();
    if cores.len() != workers + 1 {
        return Err(format!(
            "{} cores for {} compute threads",
            cores.len(),
            workers + 1
        ));
    }
    let failures = std::sync::Mutex::new(Vec::new());
    // Every pool thread runs this once with its own index; the caller runs it with `workers`.
    pool.execute(|tid| {
        let core = if tid == workers {
            cores[0]
        } else {
            cores[tid + 1]
        };
        if let Err(e) = pin_current_thread(core) {
            failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("core {core}: {e}"));
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("pinning compute threads: {}", failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_lists_parse_and_format() {
        assert_eq!(parse_core_list("0-3,8").unwrap(), vec![0, 1, 2, 3, 8]);
        assert_eq!(parse_core_list(" 5 ").unwrap(), vec![5]);
        assert_eq!(format_core_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        for bad in ["", "1,", "a", "3-1", "1,1", "0-2,2", "-1", "99999"] {
            assert!(parse_core_list(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn pinning_moves_the_thread_and_refuses_a_core_it_may_not_use() {
        let allowed = allowed_cores().unwrap();
        let last = *allowed.last().unwrap();
        std::thread::spawn(move || {
            pin_current_thread(last).unwrap();
            assert_eq!(allowed_cores().unwrap(), vec![last]);
        })
        .join()
        .unwrap();
        let missing = (0..MAX_CORES).find(|c| !allowed.contains(c)).unwrap();
        let err = check_available(&[missing]).unwrap_err();
        assert!(err.contains("not available"), "{err}");
    }
}
