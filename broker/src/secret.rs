//! Secrets in the config file: where their values come from and what makes one acceptable.
//!
//! A config file is copied into images, repositories and CI logs, so a secret should not
//! have to be written in it: any secret key may instead say `${NAME}` (the value of the
//! environment variable NAME, which must be set) and `management.tokens_file` reads tokens
//! from a file (a mounted Kubernetes or Docker secret). A management token that anyone
//! could guess — short, or one of the placeholders that example configs and tutorials
//! print — is refused at start, so a deployment that kept an example's token never runs.
//! `check-config` prints every secret as [`REDACTED`].

use std::path::Path;

/// The fewest bytes a management token may have (`openssl rand -hex 32` makes 64).
pub const MIN_TOKEN_BYTES: usize = 32;

/// How `check-config` prints a secret written literally in the file.
pub const REDACTED: &str = "<redacted>";

/// What the operator is told to run to make a token.
pub const HOW_TO_MAKE_ONE: &str = "make one with `openssl rand -hex 32`";

/// Placeholders seen in example configs and tutorials, compared without case, `-` or `_`.
const PLACEHOLDERS: &[&str] = &[
    "changeme",
    "changemeplease",
    "replaceme",
    "composedemotoken",
    "secret",
    "s3cret",
    "token",
    "password",
    "example",
    "yourtoken",
    "yourtokenhere",
    "mytoken",
    "test",
];

/// The value of a secret key: `${NAME}` is the environment variable NAME (set and not
/// empty), anything else is the value itself.
pub fn resolve(value: &str) -> Result<String, String> {
    let Some(name) = env_reference(value) else {
        return Ok(value.to_owned());
    };
    match std::env::var(name) {
        Ok(found) if !found.trim().is_empty() => Ok(found.trim().to_owned()),
        Ok(_) => Err(format!("environment variable {name} is empty")),
        Err(_) => Err(format!("environment variable {name} is not set")),
    }
}

/// `NAME` when `value` is exactly `${NAME}`.
fn env_reference(value: &str) -> Option<&str> {
    let name = value.strip_prefix("${")?.strip_suffix('}')?;
    let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    valid.then_some(name)
}

/// The tokens in a file: one per line; blank lines and lines starting with `#` skipped.
pub fn read_token_file(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        return Err(format!("{} holds no token", path.display()));
    }
    Ok(tokens)
}

/// Refuses a token that can be guessed: shorter than [`MIN_TOKEN_BYTES`], one of the
/// documented placeholders, or one character repeated.
pub fn check_token(token: &str) -> Result<(), String> {
    let folded: String = token
        .chars()
        .filter(|c| !matches!(c, '-' | '_'))
        .flat_map(char::to_lowercase)
        .collect();
    let unguessed = PLACEHOLDERS
        .iter()
        .fold(folded, |rest, placeholder| rest.replace(placeholder, ""));
    if unguessed.len() < MIN_TOKEN_BYTES / 2 && token.len() >= MIN_TOKEN_BYTES {
        return Err(format!(
            "a token must not be made of placeholders such as `change-me` (they are published \
             in examples); {HOW_TO_MAKE_ONE}"
        ));
    }
    if token.len() < MIN_TOKEN_BYTES {
        return Err(format!(
            "a token must be at least {MIN_TOKEN_BYTES} bytes (this one has {}); {HOW_TO_MAKE_ONE}",
            token.len()
        ));
    }
    let mut chars = token.chars();
    let first = chars.next();
    if chars.all(|c| Some(c) == first) {
        return Err(format!(
            "a token must not be one character repeated; {HOW_TO_MAKE_ONE}"
        ));
    }
    Ok(())
}

/// How `check-config` shows a secret: an environment reference as written (it tells where
/// the value comes from and holds none of it), anything else as [`REDACTED`].
pub fn redact(value: &str) -> String {
    match env_reference(value) {
        Some(_) => value.to_owned(),
        None => REDACTED.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guessable_tokens_are_refused_with_the_way_to_make_one() {
        for weak in [
            "change-me",
            "compose-demo-token",
            "s3cret",
            "short",
            "CHANGE_ME_CHANGE_ME_CHANGE_ME_CHANGE_ME",
            &"a".repeat(40),
        ] {
            let reason = check_token(weak).unwrap_err();
            assert!(reason.contains("openssl rand -hex 32"), "{weak}: {reason}");
        }
        check_token("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08").unwrap();
        check_token("0123456789abcdef0123456789abcdef").unwrap();
    }

    #[test]
    fn environment_references_resolve_or_name_the_variable() {
        // SAFETY-free: a variable only this test uses.
        assert_eq!(resolve("literal").unwrap(), "literal");
        assert!(
            resolve("${SWITCHBOARD_SECRET_TEST_UNSET}")
                .unwrap_err()
                .contains("SWITCHBOARD_SECRET_TEST_UNSET is not set")
        );
        let path = std::env::var("PATH").unwrap();
        assert_eq!(resolve("${PATH}").unwrap(), path.trim());
        assert_eq!(resolve("${not a name}").unwrap(), "${not a name}");
    }

    #[test]
    fn redaction_keeps_references_and_hides_values() {
        assert_eq!(redact("${TOKEN}"), "${TOKEN}");
        assert_eq!(redact("hunter2"), REDACTED);
    }

    #[test]
    fn token_files_skip_blanks_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# rotated 2026-12\n\n  abc  \ndef\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), vec!["abc", "def"]);
        std::fs::write(&path, "# none\n").unwrap();
        assert!(
            read_token_file(&path)
                .unwrap_err()
                .contains("holds no token")
        );
    }
}
