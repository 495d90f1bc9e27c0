/// The last 4 characters of a secret, the only part ever shown back.
pub fn last4(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    let start = chars.len().saturating_sub(4);
    // Short secrets would be revealed whole; show nothing of them.
    if chars.len() < 8 {
        return String::new();
    }
    chars[start..].iter().collect()
}

/// A log-safe rendering of a secret: `****abcd`, or `(unset)`.
pub fn mask(secret: &str) -> String {
    if secret.is_empty() {
        "(unset)".to_owned()
    } else {
        format!("****{}", last4(secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_only_the_tail_of_long_secrets() {
        assert_eq!(last4("live_abcdefgh1234"), "1234");
        assert_eq!(last4("short"), "");
        assert_eq!(mask(""), "(unset)");
        assert_eq!(mask("live_abcdefgh1234"), "****1234");
    }
}
