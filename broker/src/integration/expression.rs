//! Compiling an integration's selection expressions, with errors that name the key.

use crate::config::check::{ConfigError, invalid};
use crate::selection::SelectionExpression;

/// `routes.KEY.integration.<key>` compiled.
pub fn expression(path: &str, key: &str, source: &str) -> Result<SelectionExpression, ConfigError> {
    SelectionExpression::parse(source)
        .map_err(|e| invalid(format!("{path}.integration.{key}"), e.to_string()))
}

/// A room route's `allow`: one `$context.authorizer.<path>` (what the backend decided, never
/// what the client sends).
pub fn allow_expression(
    path: &str,
    source: Option<&str>,
) -> Result<Option<SelectionExpression>, ConfigError> {
    let Some(source) = source else {
        return Ok(None);
    };
    let allow = expression(path, "allow", source)?;
    if allow.uses_body() || !allow.uses_authorizer() {
        return Err(invalid(
            format!("{path}.integration.allow"),
            "must be a `$context.authorizer.<path>` (the client's frame cannot grant rooms)",
        ));
    }
    Ok(Some(allow))
}
