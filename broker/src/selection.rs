//! AWS selection expressions (`$request.body.action`, `${request.body.a}-${request.body.b}`,
//! `\$default`), compiled once at config load and evaluated against each inbound JSON frame.
//! Templates may also name the connection's authorizer context
//! (`user:${context.authorizer.principalId}`), which the backend controls and the client
//! cannot change.
//!
//! Pure code: no I/O, no panics on any input.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

/// A compiled selection expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectionExpression {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// A path into the frame's JSON body: `$request.body.meta.kind` → `["meta", "kind"]`.
    BodyPath(Vec<String>),
    /// A path into the connection's authorizer context: `$context.authorizer.rooms`.
    AuthorizerPath(Vec<String>),
}

/// Why an expression does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    #[error("empty selection expression")]
    Empty,
    #[error("`{{` at byte {0} is never closed with `}}`")]
    UnclosedBrace(usize),
    #[error("`$` at byte {0} starts no variable (write `\\$` for a literal dollar)")]
    DanglingDollar(usize),
    #[error(
        "unsupported variable `${0}`: only `$request.body.<path>` and `$context.authorizer.<path>` can select (write `\\$` for a literal dollar)"
    )]
    UnsupportedVariable(String),
    #[error("variable `${0}` has an empty path segment")]
    EmptySegment(String),
}

impl SelectionExpression {
    /// Compiles `source`.
    pub fn parse(source: &str) -> Result<Self, SelectionError> {
        if source.is_empty() {
            return Err(SelectionError::Empty);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let bytes = source.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if bytes.get(i + 1) == Some(&b'$') => {
                    literal.push('$');
                    i += 2;
                }
                b'$' => {
                    let (variable, next) = if bytes.get(i + 1) == Some(&b'{') {
                        let close = source[i + 2..]
                            .find('}')
                            .ok_or(SelectionError::UnclosedBrace(i + 1))?;
                        (&source[i + 2..i + 2 + close], i + 2 + close + 1)
                    } else {
                        let len = source[i + 1..]
                            .find(|c: char| !is_path_char(c))
                            .unwrap_or(source.len() - i - 1);
                        (&source[i + 1..i + 1 + len], i + 1 + len)
                    };
                    if variable.is_empty() {
                        return Err(SelectionError::DanglingDollar(i));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(compile_variable(variable)?);
                    i = next;
                }
                _ => {
                    // Copy the whole UTF-8 character.
                    let ch = source[i..].chars().next().unwrap_or('\u{fffd}');
                    literal.push(ch);
                    i += ch.len_utf8();
                }
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }

    /// The expression as written in the config.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates against a parsed frame body. `None` when a variable is missing or null:
    /// the frame then selects no route and goes to `$default`.
    pub fn evaluate<'a>(&'a self, body: &'a Value) -> Option<Cow<'a, str>> {
        self.evaluate_in(body, None)
    }

    /// Evaluates against a frame body and the connection's authorizer context (`None`:
    /// it has none, and `$context.authorizer.*` selects nothing).
    pub fn evaluate_in<'a>(
        &'a self,
        body: &'a Value,
        authorizer: Option<&'a Value>,
    ) -> Option<Cow<'a, str>> {
        if let [single] = self.parts.as_slice() {
            return evaluate_part(single, body, authorizer);
        }
        let mut out = String::new();
        for part in &self.parts {
            out.push_str(&evaluate_part(part, body, authorizer)?);
        }
        Some(Cow::Owned(out))
    }

    /// The JSON value a single-variable expression names (an array stays an array), for
    /// checks that take lists. `None` for templates and missing values.
    pub fn select_value<'a>(
        &self,
        body: &'a Value,
        authorizer: Option<&'a Value>,
    ) -> Option<&'a Value> {
        match self.parts.as_slice() {
            [Part::BodyPath(path)] => follow(body, path),
            [Part::AuthorizerPath(path)] => follow(authorizer?, path),
            _ => None,
        }
    }

    /// Whether it names the authorizer context (and so needs it to evaluate).
    pub fn uses_authorizer(&self) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::AuthorizerPath(_)))
    }

    /// Whether it names the frame's body.
    pub fn uses_body(&self) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::BodyPath(_)))
    }

    /// Parses `frame` as JSON and evaluates; `None` for non-JSON frames too.
    pub fn evaluate_frame(&self, frame: &[u8]) -> Option<String> {
        let body: Value = serde_json::from_slice(frame).ok()?;
        self.evaluate(&body).map(Cow::into_owned)
    }
}

impl fmt::Display for SelectionExpression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

fn compile_variable(variable: &str) -> Result<Part, SelectionError> {
    let (path, make): (_, fn(Vec<String>) -> Part) =
        if let Some(path) = variable.strip_prefix("request.body") {
            (path, Part::BodyPath)
        } else if let Some(path) = variable.strip_prefix("context.authorizer") {
            (path, Part::AuthorizerPath)
        } else {
            return Err(SelectionError::UnsupportedVariable(variable.to_owned()));
        };
    if path.is_empty() {
        // `$request.body` itself: the whole body (or the whole context).
        return Ok(make(Vec::new()));
    }
    let path = path
        .strip_prefix('.')
        .ok_or_else(|| SelectionError::UnsupportedVariable(variable.to_owned()))?;
    let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
    if segments.iter().any(String::is_empty) {
        return Err(SelectionError::EmptySegment(variable.to_owned()));
    }
    Ok(make(segments))
}

fn follow<'a>(root: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(root, |value, key| value.as_object()?.get(key))
}

fn evaluate_part<'a>(
    part: &'a Part,
    body: &'a Value,
    authorizer: Option<&'a Value>,
) -> Option<Cow<'a, str>> {
    let value = match part {
        Part::Literal(text) => return Some(Cow::Borrowed(text)),
        Part::BodyPath(path) => follow(body, path)?,
        Part::AuthorizerPath(path) => follow(authorizer?, path)?,
    };
    match value {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Null => None,
        Value::Bool(_) | Value::Number(_) | Value::Array(_) | Value::Object(_) => {
            Some(Cow::Owned(value.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn eval(expr: &str, body: Value) -> Option<String> {
        SelectionExpression::parse(expr)
            .unwrap()
            .evaluate(&body)
            .map(Cow::into_owned)
    }

    #[test]
    fn templates_may_name_the_authorizer_context() {
        let expression =
            SelectionExpression::parse("user:${context.authorizer.principalId}").unwrap();
        assert!(expression.uses_authorizer() && !expression.uses_body());
        let context = json!({"principalId": "alice", "rooms": ["a", "b"]});
        assert_eq!(
            expression
                .evaluate_in(&json!({}), Some(&context))
                .as_deref(),
            Some("user:alice")
        );
        assert_eq!(
            expression.evaluate(&json!({"principalId": "mallory"})),
            None,
            "not the body"
        );
        let rooms = SelectionExpression::parse("$context.authorizer.rooms").unwrap();
        assert_eq!(
            rooms.select_value(&json!({}), Some(&context)),
            Some(&json!(["a", "b"]))
        );
        assert_eq!(rooms.select_value(&json!({}), None), None);
        assert!(SelectionExpression::parse("$context.identity.sourceIp").is_err());
    }

    #[test]
    fn simple_body_path() {
        assert_eq!(
            eval("$request.body.action", json!({"action": "sendMessage"})),
            Some("sendMessage".into())
        );
    }

    #[test]
    fn nested_path() {
        assert_eq!(
            eval("$request.body.meta.kind", json!({"meta": {"kind": "k"}})),
            Some("k".into())
        );
    }

    #[test]
    fn braced_template_with_several_variables() {
        let body = json!({"type": "order", "version": 2});
        assert_eq!(
            eval("${request.body.type}-${request.body.version}", body),
            Some("order-2".into())
        );
    }

    #[test]
    fn escaped_dollar_is_literal() {
        assert_eq!(eval("\\$default", json!({})), Some("$default".into()));
    }

    #[test]
    fn plain_literal() {
        assert_eq!(eval("fixed", json!({})), Some("fixed".into()));
    }

    #[test]
    fn missing_or_null_selects_nothing() {
        assert_eq!(eval("$request.body.action", json!({"other": 1})), None);
        assert_eq!(eval("$request.body.action", json!({"action": null})), None);
        assert_eq!(eval("$request.body.action", json!([1, 2])), None);
        assert_eq!(
            eval("${request.body.a}-${request.body.b}", json!({"a": "x"})),
            None
        );
    }

    #[test]
    fn values_are_not_re_evaluated() {
        assert_eq!(
            eval(
                "$request.body.action",
                json!({"action": "$request.body.x", "x": "no"})
            ),
            Some("$request.body.x".into())
        );
    }

    #[test]
    fn variable_ends_at_non_path_character() {
        assert_eq!(
            eval("$request.body.a/x", json!({"a": "v"})),
            Some("v/x".into())
        );
    }

    #[test]
    fn bad_expressions_are_refused() {
        assert_eq!(SelectionExpression::parse(""), Err(SelectionError::Empty));
        assert!(matches!(
            SelectionExpression::parse("${request.body.a"),
            Err(SelectionError::UnclosedBrace(_))
        ));
        assert!(matches!(
            SelectionExpression::parse("$default"),
            Err(SelectionError::UnsupportedVariable(_))
        ));
        assert!(matches!(
            SelectionExpression::parse("$ x"),
            Err(SelectionError::DanglingDollar(0))
        ));
        assert!(matches!(
            SelectionExpression::parse("$request.body..a"),
            Err(SelectionError::EmptySegment(_))
        ));
        assert!(matches!(
            SelectionExpression::parse("$context.routeKey"),
            Err(SelectionError::UnsupportedVariable(_))
        ));
    }

    #[test]
    fn non_json_frame_selects_nothing() {
        let expr = SelectionExpression::parse("$request.body.action").unwrap();
        assert_eq!(expr.evaluate_frame(b"not json"), None);
        assert_eq!(
            expr.evaluate_frame(br#"{"action":"go"}"#),
            Some("go".into())
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(source in ".{0,64}") {
            let _ = SelectionExpression::parse(&source);
        }

        #[test]
        fn evaluate_never_panics(frame in proptest::collection::vec(any::<u8>(), 0..256)) {
            let expr = SelectionExpression::parse("${request.body.a}-$request.body.b.c").unwrap();
            let _ = expr.evaluate_frame(&frame);
        }

        #[test]
        fn any_string_action_round_trips(action in "[^\\x00]{1,32}") {
            let body = json!({"action": action.clone()});
            prop_assert_eq!(eval("$request.body.action", body), Some(action));
        }

        #[test]
        fn escaped_literals_round_trip(text in "[a-zA-Z0-9 _-]{0,16}") {
            let source = format!("\\${text}");
            prop_assert_eq!(eval(&source, json!({})), Some(format!("${text}")));
        }
    }
}
