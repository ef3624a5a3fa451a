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
        resumed: false,
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
    let mut check = jwt_check(Some("s3cret"), None).unwrap();
    if let Check::Jwt { validation, .. } = &mut check {
        restrict(
            validation,
            Some("https://issuer.test"),
            Some("switchboard"),
            0,
        );
    }
    Authorizer { source, check }
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
fn principals_ignore_what_changes_between_tokens_of_one_identity() {
    let raw = |text: &str| RawValue::from_string(text.to_owned()).unwrap();
    let alice = raw(r#"{"principalId":"alice","exp":1}"#);
    let alice_later = raw(r#"{"exp":2,"principalId":"alice","tier":"pro"}"#);
    let bob = raw(r#"{"principalId":"bob","exp":1}"#);
    assert_eq!(principal_of(Some(&alice)), principal_of(Some(&alice_later)));
    assert_ne!(principal_of(Some(&alice)), principal_of(Some(&bob)));
    let keyed = raw(r#"{"apiKey":"api-key-0","iat":5}"#);
    let keyed_again = raw(r#"{"iat":9,"apiKey":"api-key-0"}"#);
    let other_key = raw(r#"{"apiKey":"api-key-1","iat":5}"#);
    assert_eq!(principal_of(Some(&keyed)), principal_of(Some(&keyed_again)));
    assert_ne!(principal_of(Some(&keyed)), principal_of(Some(&other_key)));
    assert_eq!(principal_of(None), None);
}

#[test]
fn a_repeated_identity_source_is_found_before_anything_is_decided() {
    let authorizer = jwt_authorizer(TokenSource::Query("token".into()));
    let once = request(&[("token", "a"), ("other", "x"), ("other", "y")], &[]);
    assert!(authorizer.repeated_source(&once).is_none());
    let twice = request(&[("token", "good"), ("token", "forged")], &[]);
    assert_eq!(
        authorizer.repeated_source(&twice).map(ToString::to_string),
        Some("query:token".to_owned())
    );
    let header = TokenSource::Header("Authorization".into());
    let headers = request(&[], &[("authorization", "a"), ("Authorization", "b")]);
    assert!(header.is_repeated(&headers));
}

#[test]
fn jwt_verdicts() {
    let authorizer = jwt_authorizer(TokenSource::Query("token".into()));
    let good = hs256(
        serde_json::json!({"sub": "alice", "iss": "https://issuer.test", "aud": "switchboard", "exp": now() + 60, "room": "lobby"}),
        "s3cret",
    );
    let Verdict::Allowed(context) = authorizer.authorize(&request(&[("token", &good)], &[])) else {
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
        (
            hs256(
                serde_json::json!({"iss": "https://issuer.test", "aud": "switchboard", "exp": now() + 600, "nbf": now() + 300}),
                "s3cret",
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
fn backend_answers_become_verdicts() {
    let policy = |effect: &str| {
        serde_json::json!({
            "principalId": "carol",
            "policyDocument": {"Version": "2012-10-17", "Statement": [
                {"Action": "execute-api:Invoke", "Effect": effect, "Resource": "*"}
            ]},
            "context": {"tier": "pro"}
        })
        .to_string()
    };
    let Some(Verdict::Allowed(context)) = verdict_from_reply(200, policy("Allow").as_bytes())
    else {
        panic!("an Allow policy allows");
    };
    let context: Value = serde_json::from_str(context.get()).unwrap();
    assert_eq!(
        context,
        serde_json::json!({"principalId": "carol", "tier": "pro"})
    );
    assert_eq!(
        verdict_from_reply(200, policy("Deny").as_bytes())
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        verdict_from_reply(200, br#"{"isAuthorized": false}"#)
            .unwrap()
            .status(),
        403
    );
    assert!(matches!(
        verdict_from_reply(200, br#"{"isAuthorized": true}"#),
        Some(Verdict::Allowed(_))
    ));
    assert_eq!(verdict_from_reply(401, b"").unwrap().status(), 401);
    assert!(verdict_from_reply(500, b"").is_none());
    assert!(verdict_from_reply(200, b"not json").is_none());
    assert!(verdict_from_reply(200, br#"{"principalId": "x"}"#).is_none());
}

#[test]
fn the_cache_keeps_verdicts_for_their_ttl_and_stays_bounded() {
    let cache = VerdictCache::new(Duration::from_secs(10));
    let now = Instant::now();
    cache.put("a".into(), &Verdict::Denied("no".into()), now);
    cache.put("b".into(), &Verdict::Missing, now);
    assert!(cache.get("a", now + Duration::from_secs(9)).is_some());
    assert!(cache.get("a", now + Duration::from_secs(11)).is_none());
    assert!(
        cache.get("b", now).is_none(),
        "a missing token is not cached"
    );
    for i in 0..CACHE_ENTRIES + 10 {
        cache.put(format!("id-{i}"), &Verdict::Denied("no".into()), now);
    }
    assert!(cache.entries.lock().unwrap().len() <= CACHE_ENTRIES);
}

#[test]
fn api_keys_name_the_key_not_its_value() {
    let authorizer = Authorizer {
        source: TokenSource::Header("x-api-key".into()),
        check: Check::ApiKeys(vec!["k-one".into(), "k-two".into()]),
    };
    let Verdict::Allowed(context) = authorizer.authorize(&request(&[], &[("X-Api-Key", "k-two")]))
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

impl Authorizer {
    /// Decides without a backend (jwt and api_key authorizers).
    fn authorize(&self, request: &HandshakeRequest) -> Verdict {
        match self.decide(request, Instant::now()) {
            Decision::Done(verdict) => verdict,
            Decision::AskBackend { .. } => panic!("this authorizer needs its backend"),
        }
    }
}

impl TokenSource {
    fn protocol_for_tests() -> Self {
        Self::parse("protocol").unwrap()
    }
}
