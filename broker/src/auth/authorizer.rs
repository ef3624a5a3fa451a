//! `$connect` authorizers: they run on the upgrade request before any backend is called,
//! and what they learn (JWT claims, which API key) reaches every event of the connection
//! as `requestContext.authorizer`, as AWS passes an authorizer's context.
//!
//! Verdicts: no token or an unreadable one is 401, a token that does not verify is 403.
//! The `http` authorizer (AWS's Lambda REQUEST authorizer) asks a backend; its answers are
//! cached per identity for a TTL ([`VerdictCache`]), and parsed by [`verdict_from_reply`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
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

    /// Whether the request carries this source more than once. The authorizer and the
    /// event the backend gets must read the same value, so such a request is refused (400)
    /// instead of picking one of the copies.
    pub fn is_repeated(&self, request: &HandshakeRequest) -> bool {
        let count = match self {
            Self::Query(name) => request.query.iter().filter(|(n, _)| n == name).count(),
            Self::Header(name) => count_headers(request, name),
            Self::Protocol => count_headers(request, "sec-websocket-protocol"),
        };
        count > 1
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

fn count_headers(request: &HandshakeRequest, name: &str) -> usize {
    request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .count()
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Query(name) => write!(f, "query:{name}"),
            Self::Header(name) => write!(f, "header:{name}"),
            Self::Protocol => f.write_str("protocol"),
        }
    }
}

/// Who an authorizer context says the client is, to bind a resumed session to the
/// identity it was opened with: `principalId` when the context has one, otherwise a hash
/// of the context less the claims that change with every token of the same identity
/// (`exp`, `iat`, `nbf`, `jti`, `auth_time`). `None` without an authorizer.
pub fn principal_of(context: Option<&RawValue>) -> Option<String> {
    let context = context?;
    let Ok(Value::Object(mut map)) = serde_json::from_str::<Value>(context.get()) else {
        return Some(format!("raw:{}", hex_sha256(context.get().as_bytes())));
    };
    if let Some(Value::String(principal)) = map.get("principalId") {
        return Some(format!("principal:{principal}"));
    }
    for claim in ["exp", "iat", "nbf", "jti", "auth_time"] {
        map.remove(claim);
    }
    // serde_json's map is ordered by key: the same claims always serialize alike.
    let canonical = Value::Object(map).to_string();
    Some(format!("context:{}", hex_sha256(canonical.as_bytes())))
}

/// Who a connection is, as presence shows it: the http authorizer's `principalId`, else a
/// JWT's `sub`; `None` without an authorizer or either.
pub fn user_of(context: Option<&RawValue>) -> Option<String> {
    let context: Value = serde_json::from_str(context?.get()).ok()?;
    ["principalId", "sub"]
        .iter()
        .find_map(|key| context.get(key)?.as_str().map(str::to_owned))
}

fn hex_sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
    /// A signed JWT whose key is picked by `kid` from a JSON Web Key Set (RS256/ES256),
    /// reloaded periodically ([`refresh_jwks`]).
    Jwks {
        keys: Arc<JwksKeys>,
        validation: Box<Validation>,
    },
    /// One of these keys, compared in constant time.
    ApiKeys(Vec<String>),
    /// A backend decides (a Lambda REQUEST authorizer): every identity source must be in
    /// the request; the answer is cached per identity for `cache_ttl`.
    Http {
        url: reqwest::Url,
        timeout: Duration,
        identity_sources: Vec<TokenSource>,
        cache: Arc<VerdictCache>,
    },
}

/// What [`Authorizer::decide`] found.
pub enum Decision {
    Done(Verdict),
    /// Ask the backend; `identity` keys the cache.
    AskBackend {
        identity: String,
    },
}

/// Verdicts of an `http` authorizer by identity, each kept for the TTL. Bounded: when full,
/// expired entries go, and if none had expired the whole cache is dropped (a flood of
/// distinct identities costs backend calls, never memory).
#[derive(Debug)]
pub struct VerdictCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Verdict)>>,
}

/// Most identities cached at once.
const CACHE_ENTRIES: usize = 10_000;

impl VerdictCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, identity: &str, now: Instant) -> Option<Verdict> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(identity)
            .filter(|(expires, _)| *expires > now)
            .map(|(_, verdict)| verdict.clone())
    }

    /// Remembers an allow or a deny (not a missing token or a backend failure).
    pub fn put(&self, identity: String, verdict: &Verdict, now: Instant) {
        if self.ttl.is_zero() || !matches!(verdict, Verdict::Allowed(_) | Verdict::Denied(_)) {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= CACHE_ENTRIES {
            entries.retain(|_, (expires, _)| *expires > now);
            if entries.len() >= CACHE_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(identity, (now + self.ttl, verdict.clone()));
    }
}

/// Reads an authorizer backend's answer: an IAM policy (`principalId`, `policyDocument`
/// whose statements must all `Allow` `execute-api:Invoke`, optional `context`) or the
/// simple form (`isAuthorized`, `context`). HTTP 401 and 403 pass through; anything else
/// unreadable is `None` (a backend failure).
pub fn verdict_from_reply(status: u16, body: &[u8]) -> Option<Verdict> {
    match status {
        401 => {
            return Some(Verdict::Malformed(
                "the authorizer answered Unauthorized".into(),
            ));
        }
        403 => return Some(Verdict::Denied("the authorizer denied the request".into())),
        200..=299 => {}
        _ => return None,
    }
    let answer: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let allowed = match (answer.get("isAuthorized"), answer.get("policyDocument")) {
        (Some(Value::Bool(allowed)), _) => *allowed,
        (_, Some(policy)) => policy_allows(policy)?,
        _ => return None,
    };
    if !allowed {
        return Some(Verdict::Denied("the authorizer denied the request".into()));
    }
    let mut context = match answer.get("context") {
        Some(Value::Object(context)) => context.clone(),
        _ => Map::new(),
    };
    if let Some(principal) = answer.get("principalId") {
        context.insert("principalId".into(), principal.clone());
    }
    Some(self::context(&Value::Object(context)))
}

/// Whether a policy document allows: at least one statement, every one an `Allow`.
fn policy_allows(policy: &Value) -> Option<bool> {
    let statements = match policy.get("Statement")? {
        Value::Array(statements) => statements.clone(),
        single @ Value::Object(_) => vec![single.clone()],
        _ => return None,
    };
    if statements.is_empty() {
        return Some(false);
    }
    Some(
        statements
            .iter()
            .all(|statement| statement.get("Effect").and_then(Value::as_str) == Some("Allow")),
    )
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
            Check::Jwt { .. } | Check::Jwks { .. } => "jwt",
            Check::ApiKeys(_) => "api_key",
            Check::Http { .. } => "http",
        };
        f.debug_struct("Authorizer")
            .field("type", &kind)
            .field("source", &self.source)
            .finish()
    }
}

/// Builds a JWT check: `secret` for HS256, or a PEM public key (RSA: RS256, EC P-256: ES256).
/// The claims it verifies besides `exp` are the caller's to set on its `validation`.
pub fn jwt_check(secret: Option<&str>, public_key_pem: Option<&[u8]>) -> Result<Check, String> {
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
    validation.validate_aud = false;
    Ok(Check::Jwt {
        key,
        validation: Box::new(validation),
    })
}

/// The claims every JWT check verifies besides the signature: `exp` and `nbf` (with
/// `leeway_secs`), and `iss` / `aud` when configured (`audience = "*"`: any audience).
pub fn restrict(
    validation: &mut Validation,
    issuer: Option<&str>,
    audience: Option<&str>,
    leeway_secs: u64,
) {
    validation.leeway = leeway_secs;
    validation.validate_nbf = true;
    if let Some(issuer) = issuer {
        validation.set_issuer(&[issuer]);
    }
    match audience {
        Some("*") | None => validation.validate_aud = false,
        Some(audience) => {
            validation.validate_aud = true;
            validation.set_audience(&[audience]);
        }
    }
}

impl Authorizer {
    /// Whether a backend decides (an http authorizer).
    pub fn is_http(&self) -> bool {
        matches!(self.check, Check::Http { .. })
    }

    /// The first identity source (the token's, or an http authorizer's) that the request
    /// repeats: such a request is refused before anything is decided.
    pub fn repeated_source(&self, request: &HandshakeRequest) -> Option<&TokenSource> {
        let sources = match &self.check {
            Check::Http {
                identity_sources, ..
            } => identity_sources.as_slice(),
            _ => std::slice::from_ref(&self.source),
        };
        sources.iter().find(|source| source.is_repeated(request))
    }

    /// Decides on an upgrade request, or says the backend must be asked.
    pub fn decide(&self, request: &HandshakeRequest, now: Instant) -> Decision {
        if let Check::Http {
            identity_sources,
            cache,
            ..
        } = &self.check
        {
            let mut identity = String::new();
            for source in identity_sources {
                let Some(value) = source.find(request) else {
                    return Decision::Done(Verdict::Missing);
                };
                identity.push_str(value);
                identity.push('\n');
            }
            return match cache.get(&identity, now) {
                Some(verdict) => Decision::Done(verdict),
                None => Decision::AskBackend { identity },
            };
        }
        let Some(token) = self.source.find(request) else {
            return Decision::Done(Verdict::Missing);
        };
        Decision::Done(match &self.check {
            Check::Jwt { key, validation } => check_jwt(token, key, validation),
            Check::Jwks { keys, validation } => check_jwks(token, keys, validation),
            Check::ApiKeys(keys) => check_api_key(token, keys),
            Check::Http { .. } => Verdict::Missing,
        })
    }

    /// Remembers a backend's answer for `identity` (http authorizers).
    pub fn cache_verdict(&self, identity: String, verdict: &Verdict) {
        if let Check::Http { cache, .. } = &self.check {
            cache.put(identity, verdict, Instant::now());
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

/// Where a key set comes from, and the set as last loaded.
#[derive(Debug)]
pub struct JwksKeys {
    pub source: JwksSource,
    current: std::sync::RwLock<Arc<JwkSet>>,
}

/// A JWKS file, or an http(s) URL.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(std::path::PathBuf),
    Url(reqwest::Url),
}

/// The largest key set document read (a real one is a few KiB).
pub const JWKS_MAX_BYTES: usize = 1 << 20;

/// How often a key set is loaded again (key rotation).
pub const JWKS_REFRESH: Duration = Duration::from_secs(600);

impl JwksKeys {
    /// A file is read now (errors are the config's); a URL is fetched once the gateway runs.
    pub fn open(source: JwksSource) -> Result<Self, String> {
        let initial = match &source {
            JwksSource::File(path) => {
                let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                parse_jwks(&text)?
            }
            JwksSource::Url(_) => JwkSet { keys: Vec::new() },
        };
        Ok(Self {
            source,
            current: std::sync::RwLock::new(Arc::new(initial)),
        })
    }

    fn current(&self) -> Arc<JwkSet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the key set with a freshly loaded one.
    pub fn replace(&self, text: &[u8]) -> Result<usize, String> {
        let set = parse_jwks(text)?;
        let count = set.keys.len();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        Ok(count)
    }
}

fn parse_jwks(text: &[u8]) -> Result<JwkSet, String> {
    serde_json::from_slice(text).map_err(|e| format!("not a JSON Web Key Set: {e}"))
}

/// Loads `keys` now and every [`JWKS_REFRESH`] until `stop`; a failed load keeps the
/// previous set (and is logged).
pub async fn refresh_jwks(
    keys: Arc<JwksKeys>,
    http: crate::integration::HttpIntegration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let loaded = match &keys.source {
            JwksSource::File(path) => std::fs::read(path).map_err(|e| e.to_string()),
            JwksSource::Url(url) => http
                .fetch(url, Duration::from_secs(10), JWKS_MAX_BYTES)
                .await
                .map(|body| body.to_vec())
                .map_err(|e| e.to_string()),
        };
        match loaded.and_then(|text| keys.replace(&text)) {
            Ok(count) => tracing::debug!(count, "JWKS loaded"),
            Err(error) => tracing::error!(%error, "JWKS load failed; keeping the previous keys"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(JWKS_REFRESH) => {}
        }
    }
}

/// Checks a token against the key its header names: RS256 or ES256 only, so a key set
/// can never be used as an HMAC secret.
fn check_jwks(token: &str, keys: &JwksKeys, template: &Validation) -> Verdict {
    let header = match jsonwebtoken::decode_header(token) {
        Ok(header) => header,
        Err(error) => return Verdict::Malformed(error.to_string()),
    };
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
        return Verdict::Denied(format!("algorithm {:?} is not accepted", header.alg));
    }
    let set = keys.current();
    let jwk = match &header.kid {
        Some(kid) => set.find(kid),
        None if set.keys.len() == 1 => set.keys.first(),
        None => None,
    };
    let Some(jwk) = jwk else {
        return Verdict::Denied("no key with that kid".into());
    };
    let key = match DecodingKey::from_jwk(jwk) {
        Ok(key) => key,
        Err(error) => return Verdict::Denied(format!("unusable key: {error}")),
    };
    let mut validation = template.clone();
    validation.algorithms = vec![header.alg];
    check_jwt(token, &key, &validation)
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
mod tests;
