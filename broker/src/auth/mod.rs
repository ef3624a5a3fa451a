//! Who may do what: [`authorizer`] decides who may connect (before `$connect`'s backend),
//! bearer tokens and [`sigv4`] who may call the management API; secrets are compared in
//! constant time. (How much a client may do is the `limits` module's.)

pub mod authorizer;
pub mod config;
pub mod sigv4;

/// Compares `presented` with every token in constant time (no early exit on the first
/// differing byte, nor on the first match), so response timing does not leak a token.
pub fn is_known_token(tokens: &[String], presented: &str) -> bool {
    use subtle::ConstantTimeEq;
    tokens
        .iter()
        .fold(subtle::Choice::from(0), |found, token| {
            found | token.as_bytes().ct_eq(presented.as_bytes())
        })
        .into()
}

#[cfg(test)]
mod tests {
    use super::is_known_token;

    #[test]
    fn tokens_compare_whole() {
        let tokens = vec!["secret-one".to_owned(), "secret-two".to_owned()];
        assert!(is_known_token(&tokens, "secret-two"));
        assert!(!is_known_token(&tokens, "secret-tw"));
        assert!(!is_known_token(&tokens, "secret-two!"));
        assert!(!is_known_token(&[], ""));
    }
}
