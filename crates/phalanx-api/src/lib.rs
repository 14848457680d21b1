//! The HTTP contract of Phalanx, in one place.
//!
//! The server, the Rust SDK, the CLI and the benches take their wire types
//! from here; nothing else defines one. [`ErrorCode`] knows, for each code,
//! its HTTP status, whether the refused request may have taken effect
//! ([`Outcome`]) and whether waiting or asking another node may help
//! ([`ErrorCode::transient`]).

pub mod error;
pub mod openapi;
pub mod types;

pub use error::{ErrorBody, ErrorCode, ErrorEnvelope, Outcome};
pub use types::*;
