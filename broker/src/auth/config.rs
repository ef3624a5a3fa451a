//! `[authorizer]`: the keys as written, and their validation into a ready [`Authorizer`]
//! (keys loaded, JWT claims to check, the http authorizer's cache).
//!
//! [`Authorizer`]: crate::auth::authorizer::Authorizer

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::check::{ConfigError, invalid, parse_http_url};

/// `[authorizer]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthorizer {
    /// "jwt" or "api_key".
    #[serde(rename = "type")]
    pub kind: String,
    /// "query:NAME", "header:NAME" (a "Bearer " prefix is stripped) or "protocol".
    #[serde(default = "default_token_source")]
    pub token: String,
    /// jwt, HS256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// jwt, RS256 or ES256: a PEM public key file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PathBuf>,
    /// jwt: a JWKS file or http(s) URL, reloaded every 10 minutes (keys picked by `kid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// jwt: clock skew allowed on exp/nbf (default 60).
    #[serde(
        default = "default_leeway_secs",
        skip_serializing_if = "Option::is_none"
    )]
    pub leeway_secs: Option<u64>,
    /// api_key: the accepted keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// http: where the REQUEST event is POSTed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// http: what identifies a caller (cache key); each must be present, else 401.
    /// Default: the `token` source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity_sources: Vec<String>,
    /// http: how long an answer is reused for the same identity (0: never; default 300).
    #[serde(
        default = "default_cache_ttl_secs",
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_ttl_secs: Option<u64>,
    /// http: the backend's time to answer (default 10000).
    #[serde(
        default = "default_authorizer_timeout_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_ms: Option<u64>,
}

fn default_cache_ttl_secs() -> Option<u64> {
    Some(300)
}

fn default_authorizer_timeout_ms() -> Option<u64> {
    Some(10_000)
}

fn default_token_source() -> String {
    "header:Authorization".into()
}

fn default_leeway_secs() -> Option<u64> {
    Some(60)
}

impl RawAuthorizer {
    pub fn validate(&self) -> Result<crate::auth::authorizer::Authorizer, ConfigError> {
        use crate::auth::authorizer::{Authorizer, Check, TokenSource, jwt_check, restrict};
        let source = TokenSource::parse(&self.token).ok_or_else(|| {
            invalid(
                "authorizer.token",
                "must be \"query:NAME\", \"header:NAME\" or \"protocol\"",
            )
        })?;
        let leeway_secs = self.leeway_secs.unwrap_or(60);
        let check = match self.kind.as_str() {
            "jwt" if self.jwks.is_some() => {
                if self.secret.is_some() || self.public_key.is_some() {
                    return Err(invalid(
                        "authorizer.jwks",
                        "use one of `secret`, `public_key` and `jwks`",
                    ));
                }
                let keys = crate::auth::authorizer::JwksKeys::open(jwks_source(
                    self.jwks.as_deref().unwrap_or_default(),
                )?)
                .map_err(|reason| invalid("authorizer.jwks", reason))?;
                // A key set is usually an identity provider's, shared by every application
                // it signs for: without an audience, their tokens would open this gateway.
                let audience = self.audience.as_deref().ok_or_else(|| {
                    invalid(
                        "authorizer.audience",
                        "required with `jwks` (the identity provider signs tokens for other \
                         applications too); write `audience = \"*\"` to accept any",
                    )
                })?;
                let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
                restrict(
                    &mut validation,
                    self.issuer.as_deref(),
                    Some(audience),
                    leeway_secs,
                );
                Check::Jwks {
                    keys: Arc::new(keys),
                    validation: Box::new(validation),
                }
            }
            "jwt" => {
                let pem = self
                    .public_key
                    .as_ref()
                    .map(|path| {
                        std::fs::read(path).map_err(|e| {
                            invalid("authorizer.public_key", format!("{}: {e}", path.display()))
                        })
                    })
                    .transpose()?;
                let secret = self
                    .secret
                    .as_deref()
                    .map(crate::secret::resolve)
                    .transpose()
                    .map_err(|reason| invalid("authorizer.secret", reason))?;
                let mut check = jwt_check(secret.as_deref(), pem.as_deref())
                    .map_err(|reason| invalid("authorizer", reason))?;
                if let Check::Jwt { validation, .. } = &mut check {
                    restrict(
                        validation,
                        self.issuer.as_deref(),
                        self.audience.as_deref(),
                        leeway_secs,
                    );
                }
                check
            }
            "api_key" if self.keys.is_empty() || self.keys.iter().any(String::is_empty) => {
                return Err(invalid(
                    "authorizer.keys",
                    "at least one non-empty key is required",
                ));
            }
            "api_key" => Check::ApiKeys(
                self.keys
                    .iter()
                    .map(|key| crate::secret::resolve(key))
                    .collect::<Result<_, _>>()
                    .map_err(|reason| invalid("authorizer.keys", reason))?,
            ),
            "http" => {
                let url = self
                    .url
                    .as_deref()
                    .ok_or_else(|| invalid("authorizer.url", "required for type \"http\""))?;
                let sources = if self.identity_sources.is_empty() {
                    vec![self.token.clone()]
                } else {
                    self.identity_sources.clone()
                };
                let identity_sources = sources
                    .iter()
                    .map(|text| {
                        TokenSource::parse(text).ok_or_else(|| {
                            invalid(
                                "authorizer.identity_sources",
                                format!("`{text}` is not \"query:NAME\", \"header:NAME\" or \"protocol\""),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?;
                let timeout_ms = self.timeout_ms.unwrap_or(10_000);
                if timeout_ms == 0 {
                    return Err(invalid("authorizer.timeout_ms", "must be greater than 0"));
                }
                Check::Http {
                    url: parse_http_url("authorizer.url", url)?,
                    timeout: Duration::from_millis(timeout_ms),
                    identity_sources,
                    cache: Arc::new(crate::auth::authorizer::VerdictCache::new(
                        Duration::from_secs(self.cache_ttl_secs.unwrap_or(300)),
                    )),
                }
            }
            other => {
                return Err(invalid(
                    "authorizer.type",
                    format!("`{other}` is not one of \"jwt\", \"http\", \"api_key\""),
                ));
            }
        };
        Ok(Authorizer { source, check })
    }
}

/// Where a JWKS comes from: an `https://` URL (`http://` only to a loopback host: the
/// keys decide who gets in, so they must not travel where they can be swapped), or a file.
fn jwks_source(text: &str) -> Result<crate::auth::authorizer::JwksSource, ConfigError> {
    use crate::auth::authorizer::JwksSource;
    let url = match reqwest::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => url,
        _ => return Ok(JwksSource::File(text.into())),
    };
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if url.scheme() == "http" && !loopback {
        return Err(invalid(
            "authorizer.jwks",
            "a key set URL must be https:// (http:// only to a loopback host)",
        ));
    }
    Ok(JwksSource::Url(url))
}
