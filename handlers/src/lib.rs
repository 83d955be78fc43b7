//! The HTTP API (axum) and its entry points: the local server and the Lambda functions.
//! One router serves both; see [`app::router`].

pub mod app;
pub mod auth;
pub mod authorizer;
pub mod config;
pub mod extract;
pub mod lambda;
pub mod openapi;
pub mod problem;
pub mod routes;
pub mod secrets;
pub mod telemetry;
pub mod throttle;

pub use app::{Application, Runtime, Service};
pub use config::Settings;
