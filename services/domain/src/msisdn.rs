/// Why a phone number was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsisdnError {
    #[error("msisdn has no digits")]
    NoDigits,
    #[error("msisdn has {0} digits; at most 15 are allowed (E.164)")]
    TooLong(usize),
    #[error("msisdn contains a character that is not a digit, space, '+', '-', '.', '(' or ')'")]
    BadCharacter,
}

/// Normalizes an MSISDN to digits only, without `+`, so `+31 6-1234 5678` and the JSON number
/// `31612345678` name the same customer. Leading `00` (international prefix) is dropped.
pub fn normalize_msisdn(raw: &str) -> Result<String, MsisdnError> {
    let mut digits = String::with_capacity(raw.len());
    for c in raw.trim().chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '+' | '-' | '.' | '(' | ')' => {}
            _ => return Err(MsisdnError::BadCharacter),
        }
    }
    let digits = match digits.strip_prefix("00") {
        Some(rest) if !rest.is_empty() => rest.to_owned(),
        _ => digits,
    };
    if digits.is_empty() {
        return Err(MsisdnError::NoDigits);
    }
    if digits.len() > 15 {
        return Err(MsisdnError::TooLong(digits.len()));
    }
    Ok(digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_formatting() {
        assert_eq!(
            normalize_msisdn("+31 6-1234 5678").as_deref(),
            Ok("31612345678")
        );
        assert_eq!(
            normalize_msisdn("0031612345678").as_deref(),
            Ok("31612345678")
        );
        assert_eq!(
            normalize_msisdn("31612345678").as_deref(),
            Ok("31612345678")
        );
        assert_eq!(normalize_msisdn("+"), Err(MsisdnError::NoDigits));
        assert_eq!(normalize_msisdn("31a"), Err(MsisdnError::BadCharacter));
        assert_eq!(
            normalize_msisdn("1234567890123456"),
            Err(MsisdnError::TooLong(16))
        );
    }

    proptest::proptest! {
        #[test]
        fn normalized_is_digits_and_idempotent(raw in "\\PC{0,40}") {
            if let Ok(n) = normalize_msisdn(&raw) {
                proptest::prop_assert!(n.bytes().all(|b| b.is_ascii_digit()));
                proptest::prop_assert_eq!(normalize_msisdn(&n), Ok(n.clone()));
            }
        }
    }
}
