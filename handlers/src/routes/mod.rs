//! Route handlers, one module per service (matching the Lambda functions).

pub mod audit;
pub mod auth;
pub mod documents;
pub mod health;
pub mod profiles;
pub mod users;
