//! Checks and normalisation of names, addresses and policies that operators and peers send.

use crate::error::CoordinatorError;
use crate::records::PolicyRecord;

/// Host part of `host:port` (IPv6 in brackets).
pub fn host_of(addr: &str) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

/// Checks a name: 1 to 40 lowercase letters, digits or '-', starting with a letter.
pub fn validate_name(kind: &str, name: &str) -> Result<(), CoordinatorError> {
    let ok = (1..=40).contains(&name.len())
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CoordinatorError::InvalidArgument(format!(
            "{kind} name `{name}` must be 1-40 lowercase letters, digits or '-', starting with a letter"
        )))
    }
}

pub(crate) fn clean_list(kind: &str, items: &[String]) -> Result<Vec<String>, CoordinatorError> {
    let mut out: Vec<String> = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if item.len() > 64
            || !item
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(CoordinatorError::InvalidArgument(format!(
                "{kind} `{item}` is not a plain word"
            )));
        }
        if !out.iter().any(|o| o == item) {
            out.push(item.to_string());
        }
    }
    Ok(out)
}

/// Normalises a policy (upper-case countries, no duplicates), refusing malformed entries.
pub fn clean_policy(policy: &PolicyRecord) -> Result<PolicyRecord, CoordinatorError> {
    let countries: Vec<String> = policy
        .countries
        .iter()
        .map(|c| c.trim().to_ascii_uppercase())
        .collect();
    for c in countries.iter().filter(|c| !c.is_empty()) {
        if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "country `{c}` is not a two-letter ISO code"
            )));
        }
    }
    Ok(PolicyRecord {
        countries: clean_list("country", &countries)?,
        required_certifications: clean_list("certification", &policy.required_certifications)?,
        excluded_providers: clean_list("provider", &policy.excluded_providers)?,
    })
}
