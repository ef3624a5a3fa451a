//! `$connect` authorizers: they run on the upgrade request before any backend is called,
//! and what they learn (JWT claims, which API key) reaches every event of the connection
//! as `requestContext.authorizer`, as AWS passes an authorizer's context.
//!
//! Verdicts: no token or an unreadable one is 401, a token that does not verify is 403.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::event::HandshakeRequest;

/// Where the token is in the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A query parameter.
    Query(String),
    /// A header; a `Bearer ` prefix is stripped.
    Header(String),
    /// `Sec-WebSocket-Protocol` (browsers cannot set headers): its last value.
    Protocol,
}

impl TokenSource {
    /// Parses `query:NAME`, `header:NAME` or `protocol`.
    pub fn parse(text: &str) -> Option<Self> {
        match text.split_once(':') {
            Some(("query", name)) if !name.is_empty() => Some(Self::Query(name.to_owned())),
            Some(("header", name)) if !name.is_empty() => Some(Self::Header(name.to_owned())),
            None if text == "protocol" => Some(Self::Protocol),
            _ => None,
        }
    }

    fn find<'a>(&self, request: &'a HandshakeRequest) -> Option<&'a str> {
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let token = match self {
            Self::Query(name) => request
                .query
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str()),
            Self::Header(name) => header(name).map(|v| v.strip_prefix("Bearer ").unwrap_or(v)),
            Self::Protocol => header("sec-websocket-protocol")
                .and_then(|v| v.rsplit(',').next())
                .map(str::trim),
        };
        token.filter(|t| !t.is_empty())
    }
}

/// What the authorizer decided.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The context to pass as `requestContext.authorizer` (a JSON object).
    Allowed(Arc<RawValue>),
    Missing,
    Malformed(String),
    Denied(String),
}

impl Verdict {
    /// The HTTP status a refused handshake gets.
    pub fn status(&self) -> u16 {
        match self {
            Self::Allowed(_) => 101,
            Self::Missing | Self::Malformed(_) => 401,
            Self::Denied(_) => 403,
        }
    }

    /// The `result` label of `switchboard_authorizer_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Allowed(_) => "allowed",
            Self::Missing => "missing",
            Self::Malformed(_) => "malformed",
            Self::Denied(_) => "denied",
        }
    }
}

/// How tokens are checked.
#[derive(Clone)]
pub enum Check {
    /// A signed JWT: the key, and what must hold (algorithm, expiry, issuer, audience).
    Jwt {
        key: DecodingKey,
        validation: Box<Validation>,
    },
    /// One of these keys, compared in constant time.
    ApiKeys(Vec<String>),
}

/// A configured `[authorizer]`, ready to run.
#[derive(Clone)]
pub struct Authorizer {
    pub source: TokenSource,
    pub check: Check,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.check {
            Check::Jwt { .. } => "jwt",
            Check::ApiKeys(_) => "api_key",
        };
        f.debug_struct("Authorizer")
            .field("type", &kind)
            .field("source", &self.source)
            .finish()
    }
}

/// Builds a JWT check: `secret` for HS256, or a PEM public key (RSA: RS256, EC P-256: ES256).
pub fn jwt_check(
    secret: Option<&str>,
    public_key_pem: Option<&[u8]>,
    issuer: Option<&str>,
    audience: Option<&str>,
    leeway_secs: u64,
) -> Result<Check, String> {
    let (key, algorithm) = match (secret, public_key_pem) {
        (Some(secret), None) => (
            DecodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        ),
        (None, Some(pem)) => match DecodingKey::from_rsa_pem(pem) {
            Ok(key) => (key, Algorithm::RS256),
            Err(_) => (
                DecodingKey::from_ec_pem(pem)
                    .map_err(|e| format!("not an RSA or EC public key: {e}"))?,
                Algorithm::ES256,
            ),
        },
        _ => return Err("exactly one of `secret` and `public_key` is required".into()),
    };
    let mut validation = Validation::new(algorithm);
    validation.leeway = leeway_secs;
    if let Some(issuer) = issuer {
        validation.set_issuer(&[issuer]);
    }
    match audience {
        Some(audience) => validation.set_audience(&[audience]),
        None => validation.validate_aud = false,
    }
    Ok(Check::Jwt {
        key,
        validation: Box::new(validation),
    })
}

impl Authorizer {
    /// Decides on an upgrade request.
    pub fn authorize(&self, request: &HandshakeRequest) -> Verdict {
        let Some(token) = self.source.find(request) else {
            return Verdict::Missing;
        };
        match &self.check {
            Check::Jwt { key, validation } => check_jwt(token, key, validation),
            Check::ApiKeys(keys) => check_api_key(token, keys),
        }
    }
}

fn check_jwt(token: &str, key: &DecodingKey, validation: &Validation) -> Verdict {
    match jsonwebtoken::decode::<Map<String, Value>>(token, key, validation) {
        Ok(data) => {
            let mut claims = data.claims;
            if let Some(subject) = claims.get("sub").cloned() {
                claims.entry("principalId").or_insert(subject);
            }
            context(&Value::Object(claims))
        }
        Err(error) => match error.kind() {
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => Verdict::Malformed(error.to_string()),
            _ => Verdict::Denied(error.to_string()),
        },
    }
}

fn check_api_key(token: &str, keys: &[String]) -> Verdict {
    use subtle::ConstantTimeEq;
    // Every key is compared (no early exit), and the index found is what the context names.
    let mut found = None;
    for (index, key) in keys.iter().enumerate() {
        if bool::from(key.as_bytes().ct_eq(token.as_bytes())) {
            found = Some(index);
        }
    }
    match found {
        Some(index) => context(&serde_json::json!({"principalId": format!("api-key-{index}")})),
        None => Verdict::Denied("unknown API key".into()),
    }
}

fn context(value: &Value) -> Verdict {
    match serde_json::value::to_raw_value(value) {
        Ok(raw) => Verdict::Allowed(Arc::from(raw)),
        Err(error) => Verdict::Denied(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn request(query: &[(&str, &str)], headers: &[(&str, &str)]) -> HandshakeRequest {
        HandshakeRequest {
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            query: query
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn hs256(claims: Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn jwt_authorizer(source: TokenSource) -> Authorizer {
        Authorizer {
            source,
            check: jwt_check(
                Some("s3cret"),
                None,
                Some("https://issuer.test"),
                Some("switchboard"),
                0,
            )
            .unwrap(),
        }
    }

    fn now() -> u64 {
        crate::clock::now_ms() / 1000
    }

    #[test]
    fn tokens_are_found_where_configured() {
        let req = request(
            &[("token", "q")],
            &[
                ("Authorization", "Bearer h"),
                ("Sec-WebSocket-Protocol", "access_token, p"),
            ],
        );
        assert_eq!(
            TokenSource::parse("query:token").unwrap().find(&req),
            Some("q")
        );
        assert_eq!(
            TokenSource::parse("header:authorization")
                .unwrap()
                .find(&req),
            Some("h")
        );
        assert_eq!(TokenSource::protocol_for_tests().find(&req), Some("p"));
        assert_eq!(TokenSource::parse("cookie:x"), None);
        assert_eq!(TokenSource::parse("query:"), None);
    }

    #[test]
    fn jwt_verdicts() {
        let authorizer = jwt_authorizer(TokenSource::Query("token".into()));
        let good = hs256(
            serde_json::json!({"sub": "alice", "iss": "https://issuer.test", "aud": "switchboard", "exp": now() + 60, "room": "lobby"}),
            "s3cret",
        );
        let Verdict::Allowed(context) = authorizer.authorize(&request(&[("token", &good)], &[]))
        else {
            panic!("a good token is allowed");
        };
        let context: Value = serde_json::from_str(context.get()).unwrap();
        assert_eq!(context["principalId"], "alice");
        assert_eq!(context["room"], "lobby");
        let cases = [
            (
                hs256(
                    serde_json::json!({"iss": "https://issuer.test", "aud": "switchboard", "exp": now() - 60}),
                    "s3cret",
                ),
                403,
            ),
            (
                hs256(
                    serde_json::json!({"iss": "https://issuer.test", "aud": "other", "exp": now() + 60}),
                    "s3cret",
                ),
                403,
            ),
            (
                hs256(
                    serde_json::json!({"iss": "https://evil.test", "aud": "switchboard", "exp": now() + 60}),
                    "s3cret",
                ),
                403,
            ),
            (
                hs256(
                    serde_json::json!({"iss": "https://issuer.test", "aud": "switchboard", "exp": now() + 60}),
                    "wrong",
                ),
                403,
            ),
            ("not.a.jwt".to_owned(), 401),
            ("garbage".to_owned(), 401),
        ];
        for (token, status) in cases {
            let verdict = authorizer.authorize(&request(&[("token", &token)], &[]));
            assert_eq!(verdict.status(), status, "{verdict:?}");
        }
        assert!(matches!(
            authorizer.authorize(&request(&[], &[])),
            Verdict::Missing
        ));
    }

    #[test]
    fn api_keys_name_the_key_not_its_value() {
        let authorizer = Authorizer {
            source: TokenSource::Header("x-api-key".into()),
            check: Check::ApiKeys(vec!["k-one".into(), "k-two".into()]),
        };
        let Verdict::Allowed(context) =
            authorizer.authorize(&request(&[], &[("X-Api-Key", "k-two")]))
        else {
            panic!("a known key is allowed");
        };
        assert_eq!(context.get(), r#"{"principalId":"api-key-1"}"#);
        assert_eq!(
            authorizer
                .authorize(&request(&[], &[("X-Api-Key", "k-three")]))
                .status(),
            403
        );
    }

    impl TokenSource {
        fn protocol_for_tests() -> Self {
            Self::parse("protocol").unwrap()
        }
    }
}
