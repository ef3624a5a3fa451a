//! Verifying AWS Signature Version 4 on management requests, as API Gateway does for
//! `execute-api`: the signature is computed again with the maintained `aws-sigv4` crate
//! from the request as received (method, the already-encoded path, which SigV4 encodes once
//! more, query, the signed headers, the body's hash) and the configured secret, then
//! compared in constant time.

use std::time::{Duration, SystemTime};

use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;

/// The only service this API answers for.
pub const SERVICE: &str = "execute-api";
/// How far the request's `X-Amz-Date` may be from our clock, either way (AWS: 5 minutes).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// One configured key pair.
#[derive(Debug, Clone)]
pub struct AwsKey {
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Why a signed request was refused; each maps to AWS's error type for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    #[error("Authorization header is not a valid AWS4-HMAC-SHA256 signature: {0}")]
    Malformed(&'static str),
    #[error("The security token included in the request is invalid.")]
    UnknownKey,
    #[error("Credential should be scoped to correct service: '{SERVICE}'.")]
    WrongService,
    #[error(
        "Signature expired: the request's X-Amz-Date is more than 5 minutes from the server's time."
    )]
    Expired,
    #[error(
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method."
    )]
    Mismatch,
}

impl SigV4Error {
    /// The `x-amzn-ErrorType` AWS answers with.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::UnknownKey => "UnrecognizedClientException",
            Self::Malformed(_) => "IncompleteSignatureException",
            Self::WrongService | Self::Expired | Self::Mismatch => "InvalidSignatureException",
        }
    }
}

/// The parts of an `Authorization: AWS4-HMAC-SHA256 ...` header.
#[derive(Debug, PartialEq, Eq)]
pub struct Authorization<'a> {
    pub access_key_id: &'a str,
    pub date: &'a str,
    pub region: &'a str,
    pub service: &'a str,
    pub signed_headers: Vec<&'a str>,
    pub signature: &'a str,
}

impl<'a> Authorization<'a> {
    /// Parses the header; `None` if it is not a SigV4 header at all.
    pub fn parse(header: &'a str) -> Option<Result<Self, SigV4Error>> {
        let fields = header.strip_prefix("AWS4-HMAC-SHA256 ")?;
        Some(Self::parse_fields(fields))
    }

    fn parse_fields(fields: &'a str) -> Result<Self, SigV4Error> {
        let mut credential = None;
        let mut signed_headers = None;
        let mut signature = None;
        for field in fields.split(',').map(str::trim) {
            match field.split_once('=') {
                Some(("Credential", value)) => credential = Some(value),
                Some(("SignedHeaders", value)) => signed_headers = Some(value),
                Some(("Signature", value)) => signature = Some(value),
                _ => return Err(SigV4Error::Malformed("unknown field")),
            }
        }
        let credential = credential.ok_or(SigV4Error::Malformed("no Credential"))?;
        let scope: Vec<&str> = credential.split('/').collect();
        let [access_key_id, date, region, service, "aws4_request"] = scope[..] else {
            return Err(SigV4Error::Malformed(
                "Credential is not KEY/DATE/REGION/SERVICE/aws4_request",
            ));
        };
        Ok(Self {
            access_key_id,
            date,
            region,
            service,
            signed_headers: signed_headers
                .ok_or(SigV4Error::Malformed("no SignedHeaders"))?
                .split(';')
                .collect(),
            signature: signature.ok_or(SigV4Error::Malformed("no Signature"))?,
        })
    }
}

/// A request as received, for verification.
pub struct ReceivedRequest<'a> {
    pub method: &'a str,
    /// Path and query exactly as they came on the wire (still percent-encoded).
    pub path_and_query: &'a str,
    /// Every header, names in any case.
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: &'a [u8],
}

/// What [`check_headers`] established: the key the request claims and when it was signed.
#[derive(Debug)]
pub struct Claimed<'k> {
    key: &'k AwsKey,
    signed_at: SystemTime,
}

/// Everything that can be checked before the body is read: a known access key, the
/// `execute-api` service, an `X-Amz-Date` within [`MAX_CLOCK_SKEW`] whose day is the
/// credential scope's, `host` signed and every signed header present. A request that fails
/// here costs the server no body read and no HMAC.
pub fn check_headers<'k>(
    authorization: &Authorization<'_>,
    headers: &[(&str, &str)],
    keys: &'k [AwsKey],
    now: SystemTime,
) -> Result<Claimed<'k>, SigV4Error> {
    let key = keys
        .iter()
        .find(|k| k.access_key_id == authorization.access_key_id)
        .ok_or(SigV4Error::UnknownKey)?;
    if authorization.service != SERVICE {
        return Err(SigV4Error::WrongService);
    }
    let amz_date =
        header(headers, "x-amz-date").ok_or(SigV4Error::Malformed("no valid X-Amz-Date header"))?;
    let signed_at =
        parse_amz_date(amz_date).ok_or(SigV4Error::Malformed("no valid X-Amz-Date header"))?;
    if !amz_date.starts_with(authorization.date) || authorization.date.len() != 8 {
        return Err(SigV4Error::Malformed(
            "the Credential's date is not the X-Amz-Date's day",
        ));
    }
    let skew = now
        .duration_since(signed_at)
        .or_else(|_| signed_at.duration_since(now))
        .unwrap_or_default();
    if skew > MAX_CLOCK_SKEW {
        return Err(SigV4Error::Expired);
    }
    if !authorization.signed_headers.contains(&"host") {
        return Err(SigV4Error::Malformed("host must be signed"));
    }
    if authorization
        .signed_headers
        .iter()
        .any(|name| header(headers, name).is_none())
    {
        return Err(SigV4Error::Malformed("a signed header is missing"));
    }
    Ok(Claimed { key, signed_at })
}

fn header<'a>(headers: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
}

/// Checks `request`'s signature against `keys` at time `now`.
pub fn verify(
    authorization: &Authorization<'_>,
    request: &ReceivedRequest<'_>,
    keys: &[AwsKey],
    now: SystemTime,
) -> Result<(), SigV4Error> {
    let Claimed { key, signed_at } = check_headers(authorization, &request.headers, keys, now)?;
    // The headers the client signed, as received; x-amz-date is added by the signer.
    let signed: Vec<(&str, &str)> = authorization
        .signed_headers
        .iter()
        .filter(|name| **name != "x-amz-date")
        .filter_map(|name| Some((*name, header(&request.headers, name)?)))
        .collect();
    let expected = signature_for(authorization, request, &signed, key, signed_at)?;
    use subtle::ConstantTimeEq;
    if bool::from(
        expected
            .as_bytes()
            .ct_eq(authorization.signature.as_bytes()),
    ) {
        Ok(())
    } else {
        Err(SigV4Error::Mismatch)
    }
}

fn signature_for(
    authorization: &Authorization<'_>,
    request: &ReceivedRequest<'_>,
    signed_headers: &[(&str, &str)],
    key: &AwsKey,
    signed_at: SystemTime,
) -> Result<String, SigV4Error> {
    let identity = aws_credential_types::Credentials::new(
        &key.access_key_id,
        &key.secret_access_key,
        None,
        None,
        "switchboard",
    )
    .into();
    let mut settings = SigningSettings::default();
    settings.excluded_headers = Some(Vec::new());
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(authorization.region)
        .name(SERVICE)
        .time(signed_at)
        .settings(settings)
        .build()
        .map_err(|_| SigV4Error::Malformed("cannot build signing parameters"))?
        .into();
    let signable = SignableRequest::new(
        request.method,
        request.path_and_query,
        signed_headers.iter().copied(),
        SignableBody::Bytes(request.body),
    )
    .map_err(|_| SigV4Error::Malformed("the request cannot be canonicalized"))?;
    let output = sign(signable, &params).map_err(|_| SigV4Error::Mismatch)?;
    Ok(output.signature().to_owned())
}

/// `YYYYMMDDTHHMMSSZ`.
fn parse_amz_date(text: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let parsed = time::PrimitiveDateTime::parse(text, format)
        .ok()?
        .assume_utc();
    let seconds = u64::try_from(parsed.unix_timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn keys() -> Vec<AwsKey> {
        vec![AwsKey {
            access_key_id: KEY.into(),
            secret_access_key: SECRET.into(),
        }]
    }

    /// Signs like an SDK: returns the Authorization and X-Amz-Date headers.
    fn client_sign(
        secret: &str,
        method: &str,
        path: &str,
        body: &[u8],
        at: SystemTime,
    ) -> (String, String) {
        let identity =
            aws_credential_types::Credentials::new(KEY, secret, None, None, "test").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("eu-west-1")
            .name(SERVICE)
            .time(at)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let headers = [
            ("host", "localhost:9090"),
            ("content-type", "application/json"),
        ];
        let request =
            SignableRequest::new(method, path, headers.into_iter(), SignableBody::Bytes(body))
                .unwrap();
        let (instructions, _) = sign(request, &params).unwrap().into_parts();
        let header = |name| {
            instructions
                .headers()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_owned())
                .unwrap()
        };
        (header("authorization"), header("x-amz-date"))
    }

    fn check(
        secret: &str,
        signed_path: &str,
        received_path: &str,
        body: &[u8],
        skew: i64,
    ) -> Result<(), SigV4Error> {
        let now = SystemTime::now();
        let at = if skew >= 0 {
            now + Duration::from_secs(skew as u64)
        } else {
            now - Duration::from_secs(skew.unsigned_abs())
        };
        let (authorization, date) = client_sign(secret, "POST", signed_path, b"hello", at);
        let parsed = Authorization::parse(&authorization).unwrap()?;
        let request = ReceivedRequest {
            method: "POST",
            path_and_query: received_path,
            headers: vec![
                ("Host", "localhost:9090"),
                ("Content-Type", "application/json"),
                ("X-Amz-Date", &date),
                ("User-Agent", "not signed"),
            ],
            body,
        };
        verify(&parsed, &request, &keys(), now)
    }

    #[test]
    fn a_correct_signature_verifies() {
        let path = "/dev/@connections/abc%3D";
        assert_eq!(check(SECRET, path, path, b"hello", 0), Ok(()));
        assert_eq!(
            check(
                SECRET,
                "/dev/@rooms/r?exclude=x%3D",
                "/dev/@rooms/r?exclude=x%3D",
                b"hello",
                0
            ),
            Ok(())
        );
    }

    #[test]
    fn a_wrong_secret_a_tampered_request_or_a_skewed_clock_is_refused() {
        let path = "/dev/@connections/abc%3D";
        assert_eq!(
            check("wrong", path, path, b"hello", 0),
            Err(SigV4Error::Mismatch)
        );
        assert_eq!(
            check(SECRET, path, path, b"hellO", 0),
            Err(SigV4Error::Mismatch)
        );
        assert_eq!(
            check(SECRET, path, "/dev/@connections/abd%3D", b"hello", 0),
            Err(SigV4Error::Mismatch)
        );
        assert_eq!(
            check(SECRET, path, path, b"hello", -400),
            Err(SigV4Error::Expired)
        );
        assert_eq!(
            check(SECRET, path, path, b"hello", 400),
            Err(SigV4Error::Expired)
        );
        assert_eq!(check(SECRET, path, path, b"hello", -200), Ok(()));
    }

    #[test]
    fn the_header_is_parsed_and_checked() {
        let header = "AWS4-HMAC-SHA256 Credential=AKID/20261127/us-east-1/execute-api/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc";
        let parsed = Authorization::parse(header).unwrap().unwrap();
        assert_eq!(parsed.access_key_id, "AKID");
        assert_eq!(parsed.signed_headers, vec!["host", "x-amz-date"]);
        assert!(Authorization::parse("Bearer x").is_none());
        assert!(matches!(
            Authorization::parse(
                "AWS4-HMAC-SHA256 Credential=a/b, SignedHeaders=host, Signature=x"
            ),
            Some(Err(SigV4Error::Malformed(_)))
        ));
        let other = header.replace("AKID", "OTHER");
        let unknown = Authorization::parse(&other).unwrap().unwrap();
        let request = ReceivedRequest {
            method: "GET",
            path_and_query: "/",
            headers: vec![],
            body: b"",
        };
        assert_eq!(
            verify(&unknown, &request, &keys(), SystemTime::now()),
            Err(SigV4Error::UnknownKey)
        );
    }
}
