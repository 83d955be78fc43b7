//! The API's Lambda authorizer (`lambda-authorizer`): API Gateway HTTP API asks it, with a
//! REQUEST authorizer event (payload 2.0), whether a request to a protected route may go
//! on, before any function runs.
//!
//! API Gateway's built-in JWT authorizer cannot check these tokens: it verifies
//! asymmetric signatures against an OIDC issuer's JWKS, and Karmic signs HS256 with a
//! shared secret. This one verifies exactly as the functions do (the same
//! [`HmacTokens`]): only HS256, the issuer, the audience, the expiry and a user id as
//! subject. It answers in the simple format; API Gateway caches the answer per
//! `Authorization` header for the authorizer's TTL. The functions still verify the token
//! themselves, so a function reached without the authorizer (a misconfigured route) is
//! no way around it.

use aws_lambda_events::apigw::{
    ApiGatewayV2CustomAuthorizerSimpleResponse, ApiGatewayV2CustomAuthorizerV2Request,
};
use serde_json::json;

use crate::auth::TokenVerifier;

/// The bearer token of an authorizer request: the identity source API Gateway extracted
/// (`$request.header.Authorization`), else the header itself.
fn bearer(request: &ApiGatewayV2CustomAuthorizerV2Request) -> Option<&str> {
    let value = request
        .identity_source
        .as_ref()
        .and_then(|sources| sources.first().map(String::as_str))
        .or_else(|| {
            request
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
        })?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether the request carries a valid access token; if so, the caller's id and role
/// travel on as the authorizer's context (`$context.authorizer.lambda.sub` / `.role`,
/// for access logs). Never fails: anything unreadable is refused.
pub fn authorize(
    verifier: &dyn TokenVerifier,
    request: &ApiGatewayV2CustomAuthorizerV2Request,
) -> ApiGatewayV2CustomAuthorizerSimpleResponse {
    let mut response = ApiGatewayV2CustomAuthorizerSimpleResponse::default();
    match bearer(request).map(|token| verifier.verify(token)) {
        Some(Ok(user)) => {
            response.is_authorized = true;
            response.context = json!({
                "sub": user.user_id.to_string(),
                "role": user.role,
            });
        }
        Some(Err(_)) | None => {
            response.is_authorized = false;
            response.context = json!({});
        }
    }
    tracing::info!(
        route = request.route_arn.as_deref().unwrap_or(""),
        authorized = response.is_authorized,
        "authorizer decision"
    );
    response
}
