//! The protocol side of `examples/serve`, OpenAI's HTTP API, without any HTTP server: parsing
//! and checking request bodies ([`CompletionRequest`], [`ChatRequest`]), building responses and
//! stream chunks from generation events ([`Reply`]), OpenAI-style errors ([`ApiError`]), and the
//! Prometheus counters ([`Metrics`]).

pub mod api;
pub mod error;
pub mod metrics;
pub mod reply;

pub use api::{ChatRequest, CompletionRequest, Options, Prompt};
pub use error::ApiError;
pub use metrics::Metrics;
pub use reply::{Event, Kind, Reply};
