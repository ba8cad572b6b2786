//! Parsing of human units on the command line: durations (`90s`, `30m`, `1h`) and sizes
//! (`512MiB`, `2GiB`, `1.5GB`).

use std::time::Duration;

/// Splits `12.5GiB` into its number and its (trimmed) unit.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    Some((number.parse().ok()?, unit.trim()))
}

/// Parses a file or folder path, refusing an empty one with a message that also covers an
/// environment variable set to nothing (which counts as given).
pub fn parse_path(text: &str) -> Result<std::path::PathBuf, String> {
    if text.is_empty() {
        return Err(
            "the path is empty (if it comes from an environment variable, unset it or give a path)"
                .into(),
        );
    }
    Ok(text.into())
}

/// Parses `N[ms|s|m|h|d]` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (value, unit) = number_and_unit(text)
        .ok_or_else(|| format!("`{text}` is not a duration like 90s, 30m or 1h"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{text}` (ms, s, m, h, d)"
            ));
        }
    };
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 1e9 {
        return Err(format!(
            "duration `{text}` is out of range (above 0, at most 1000000000 s)"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses a join token's lifetime: a duration from 1 s to 30 days.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let range = || format!("a join token lives from 1s to 30d, not `{text}`");
    let ttl = parse_duration(text).map_err(|e| {
        if e.contains("out of range") {
            range()
        } else {
            e
        }
    })?;
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(30 * 86400) {
        return Err(range());
    }
    Ok(ttl)
}

/// Parses a size: `N[B|KB|MB|GB|TB|KiB|MiB|GiB|TiB]` (a bare number is bytes).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let (value, unit) = number_and_unit(text)
        .ok_or_else(|| format!("`{text}` is not a size like 512MiB or 2GiB"))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        other => return Err(format!("unknown size unit `{other}` in `{text}`")),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || !(1.0..=1e18).contains(&bytes) {
        return Err(format!(
            "size `{text}` is out of range (1 byte to 1000000 TB)"
        ));
    }
    Ok(bytes as u64)
}

/// Formats bytes as GiB/MiB for people.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_not_be_empty() {
        assert_eq!(parse_path("a/b"), Ok(std::path::PathBuf::from("a/b")));
        assert!(parse_path("").unwrap_err().contains("environment variable"));
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("0").unwrap_err().contains("1 byte to"));
        assert!(
            parse_duration("99999999999")
                .unwrap_err()
                .contains("at most")
        );
    }

    #[test]
    fn join_token_lifetimes_are_1s_to_30_days() {
        assert_eq!(parse_ttl("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert_eq!(parse_ttl("1s").unwrap(), Duration::from_secs(1));
        for bad in ["31d", "500ms", "0s", "99999999999h"] {
            let err = parse_ttl(bad).unwrap_err();
            assert!(err.contains("from 1s to 30d"), "{bad}: {err}");
        }
    }
}
