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

/// ISO 3166-1 alpha-2 codes in use, and XK (Kosovo), which the EU and most registries use.
const COUNTRIES: [&str; 250] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
    "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
    "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
    "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
    "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
    "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
    "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
    "VN", "VU", "WF", "WS", "XK", "YE", "YT", "ZA", "ZM", "ZW",
];

/// Upper-cases a country code and checks it is an ISO 3166-1 alpha-2 code in use.
pub fn clean_country(country: &str) -> Result<String, CoordinatorError> {
    let c = country.trim().to_ascii_uppercase();
    if COUNTRIES.binary_search(&c.as_str()).is_ok() {
        return Ok(c);
    }
    // Codes people write for these countries that ISO gives to no one.
    let hint = match c.as_str() {
        "UK" => " (the United Kingdom is GB)",
        "EL" => " (Greece is GR)",
        _ => "",
    };
    Err(CoordinatorError::InvalidArgument(format!(
        "country `{c}` is not an ISO 3166-1 alpha-2 code{hint}; write a country as FR, DE, NL, …"
    )))
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
            "{kind} name `{}` must be 1-40 lowercase letters, digits or '-', starting with a letter",
            crate::error::shown(name, 80)
        )))
    }
}

/// Most entries a list of a policy or of a provider's certifications may hold.
pub const MAX_LIST_ITEMS: usize = 256;

/// Refuses a list of `kind` entries longer than [`MAX_LIST_ITEMS`].
fn check_list_len(kind: &str, items: &[String]) -> Result<(), CoordinatorError> {
    if items.len() > MAX_LIST_ITEMS {
        return Err(CoordinatorError::InvalidArgument(format!(
            "{} {kind} entries given; at most {MAX_LIST_ITEMS} are allowed",
            items.len()
        )));
    }
    Ok(())
}

pub(crate) fn clean_list(kind: &str, items: &[String]) -> Result<Vec<String>, CoordinatorError> {
    check_list_len(kind, items)?;
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
    check_list_len("country", &policy.countries)?;
    let countries: Vec<String> = policy
        .countries
        .iter()
        .map(|c| c.trim().to_ascii_uppercase())
        .collect();
    for c in countries.iter().filter(|c| !c.is_empty()) {
        clean_country(c)?;
    }
    Ok(PolicyRecord {
        countries: clean_list("country", &countries)?,
        required_certifications: clean_list("certification", &policy.required_certifications)?,
        excluded_providers: clean_list("provider", &policy.excluded_providers)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn countries_are_sorted_and_distinct() {
        assert!(COUNTRIES.windows(2).all(|w| w[0] < w[1]));
        assert!(
            COUNTRIES
                .iter()
                .all(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase()))
        );
    }

    #[test]
    fn country_codes_are_checked_against_iso() {
        for ok in ["FR", "de", " nl ", "XK", "ZW", "AD"] {
            assert_eq!(clean_country(ok).unwrap(), ok.trim().to_ascii_uppercase());
        }
        for bad in ["ZZ", "EU", "AA", "FRA", "F", "", "1A", "ÉS"] {
            let e = clean_country(bad).unwrap_err().to_string();
            assert!(e.contains("ISO 3166-1"), "{bad}: {e}");
        }
        assert!(clean_country("uk").unwrap_err().to_string().contains("GB"));
        let policy = PolicyRecord {
            countries: vec!["fr".into(), "ZZ".into()],
            ..Default::default()
        };
        assert!(
            clean_policy(&policy)
                .unwrap_err()
                .to_string()
                .contains("`ZZ`")
        );
    }

    #[test]
    fn long_lists_are_refused_before_any_work() {
        let many: Vec<String> = (0..100_000).map(|i| format!("c{i}")).collect();
        for policy in [
            PolicyRecord {
                required_certifications: many.clone(),
                ..Default::default()
            },
            PolicyRecord {
                excluded_providers: many.clone(),
                ..Default::default()
            },
            PolicyRecord {
                countries: vec!["FR".into(); 100_000],
                ..Default::default()
            },
        ] {
            let e = clean_policy(&policy).unwrap_err().to_string();
            assert!(e.contains("at most 256"), "{e}");
        }
        let most: Vec<String> = (0..MAX_LIST_ITEMS).map(|i| format!("c{}", i % 7)).collect();
        assert_eq!(clean_list("certification", &most).unwrap().len(), 7);
    }
}
