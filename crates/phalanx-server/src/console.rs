//! The web console at `/ui`: three static files (an HTML page, one vanilla
//! JavaScript module, a style sheet) embedded in the binary, so every node
//! serves the same console with nothing to install and no Node.js anywhere.
//!
//! The console holds no state and has no privileges of its own: it reads and
//! writes through the public JSON API with the token the operator types in
//! (kept in the browser's sessionStorage), exactly as the CLI does. So this
//! module owns only the files and their headers; authentication, forwarding
//! to the leader and every decision stay with `api.rs`. The files are served
//! without a token because they contain nothing but code.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderName;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../console/index.html");
const CONSOLE_JS: &str = include_str!("../console/console.js");
const CONSOLE_CSS: &str = include_str!("../console/console.css");

/// The page may load only its own files and talk only to its own node: a
/// payload rendered by mistake as HTML still could not run or send anything.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console's routes, merged into `api::router` (generic in the state so
/// that it merges into any router).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/ui/", get(|| async { Redirect::permanent("/ui") }))
        .route("/ui/console.js", get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }))
        .route("/ui/console.css", get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, content_type),
            // Revalidated every time: after an upgrade the new console is the one shown.
            (CACHE_CONTROL, "no-cache"),
            (HeaderName::from_static("content-security-policy"), CONTENT_SECURITY_POLICY),
            (HeaderName::from_static("x-content-type-options"), "nosniff"),
            (HeaderName::from_static("referrer-policy"), "no-referrer"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page refers to the two other files by the paths served here.
    #[test]
    fn the_page_loads_the_served_assets() {
        assert!(INDEX_HTML.contains(r#"src="/ui/console.js""#));
        assert!(INDEX_HTML.contains(r#"href="/ui/console.css""#));
        assert!(CONSOLE_JS.len() < 64 * 1024, "the console stays small");
    }
}
