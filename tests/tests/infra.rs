//! The AWS template (`infra/template.yaml`) against the code, so that neither drifts from
//! the other: every route the template gives a function is one that function's router
//! serves and the OpenAPI document describes, with the same authentication; every
//! operation in the OpenAPI document has a route in the template; the routes of one
//! function are not served by another; every function's code is one of the Lambda
//! binaries; and the authorizer guards every route not marked public.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use handlers::Service;
use serde_json::Value;
use serde_yaml::Value as Yaml;
use tests::{Backend, TestDb};
use tower::ServiceExt;

const TEMPLATE: &str = include_str!("../../infra/template.yaml");
const OPENAPI: &str = include_str!("../../docs/openapi.json");

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Route {
    method: String,
    path: String,
    public: bool,
}

/// A function of the template: its binary (from `CodeUri`) and its HTTP API routes.
#[derive(Debug)]
struct Function {
    logical_id: String,
    binary: String,
    routes: Vec<Route>,
}

fn template() -> Yaml {
    serde_yaml::from_str(TEMPLATE).expect("infra/template.yaml is YAML")
}

/// `!Ref Name` (a tagged value) → `Name`.
fn reference(v: &Yaml) -> Option<String> {
    match v {
        Yaml::Tagged(t) if t.tag == "Ref" || t.tag == "!Ref" => t.value.as_str().map(str::to_owned),
        _ => None,
    }
}

fn functions() -> Vec<Function> {
    let doc = template();
    let resources = doc["Resources"].as_mapping().expect("Resources");
    let mut out = Vec::new();
    for (id, resource) in resources {
        if resource["Type"].as_str() != Some("AWS::Serverless::Function") {
            continue;
        }
        let props = &resource["Properties"];
        let code = props["CodeUri"]
            .as_str()
            .expect("a function's CodeUri is a path");
        let binary = code
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap()
            .to_owned();
        let mut routes = Vec::new();
        if let Some(events) = props["Events"].as_mapping() {
            for (_, event) in events {
                if event["Type"].as_str() != Some("HttpApi") {
                    continue;
                }
                let p = &event["Properties"];
                assert_eq!(
                    reference(&p["ApiId"]).as_deref(),
                    Some("HttpApi"),
                    "{id:?}: every route belongs to the one HTTP API"
                );
                routes.push(Route {
                    method: p["Method"].as_str().unwrap().to_uppercase(),
                    path: p["Path"].as_str().unwrap().to_owned(),
                    public: p["Auth"]["Authorizer"].as_str() == Some("NONE"),
                });
            }
        }
        out.push(Function {
            logical_id: id.as_str().unwrap().to_owned(),
            binary,
            routes,
        });
    }
    out
}

/// The OpenAPI document's operations (method, path, public = no security requirement).
fn openapi_routes() -> BTreeSet<Route> {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    assert!(
        doc.get("security").is_none(),
        "no global security requirement"
    );
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                continue;
            }
            let public = op
                .get("security")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
            out.insert(Route {
                method: method.to_uppercase(),
                path: path.clone(),
                public,
            });
        }
    }
    out
}

fn service(binary: &str) -> Option<Service> {
    match binary {
        "lambda-auth" => Some(Service::Auth),
        "lambda-users" => Some(Service::Users),
        "lambda-profiles" => Some(Service::Profiles),
        "lambda-documents" => Some(Service::Documents),
        _ => None,
    }
}

/// Whether `router` has a route for `method path` (path parameters filled in): anything
/// but the router's own "no such route" 404 and its 405.
async fn routed(router: &axum::Router, method: &str, path: &str) -> bool {
    let uri = path
        .split('/')
        .map(|seg| {
            if seg.starts_with('{') {
                "0190f0c4-1b2c-7d3e-8f40-000000000001"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/");
    let request = http::Request::builder()
        .method(method)
        .uri(&uri)
        .header("content-type", "application/json")
        .body(axum::body::Body::from("{}"))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let detail = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["detail"].as_str().map(str::to_owned));
    !(status == 405 || (status == 404 && detail.as_deref() == Some("no such route")))
}

#[test]
fn the_template_routes_are_the_openapi_operations() {
    let mut in_template = BTreeSet::new();
    for f in functions() {
        for r in f.routes {
            assert!(in_template.insert(r.clone()), "{r:?} is routed twice");
        }
    }
    // The document does not describe itself.
    let document = Route {
        method: "GET".into(),
        path: "/openapi.json".into(),
        public: true,
    };
    assert!(in_template.remove(&document), "GET /openapi.json is routed");
    let described = openapi_routes();
    let missing: Vec<_> = described.difference(&in_template).collect();
    let extra: Vec<_> = in_template.difference(&described).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "template and OpenAPI differ (a public flag that differs shows up in both):\nin the OpenAPI document only: {missing:#?}\nin the template only: {extra:#?}"
    );
}

#[tokio::test]
async fn each_function_serves_exactly_the_routes_the_template_gives_it() {
    let db = TestDb::new(Backend::Sqlite).await;
    let rt = tests::runtime(&db).await;
    let functions = functions();
    let all: Vec<(String, Route)> = functions
        .iter()
        .flat_map(|f| f.routes.iter().map(|r| (f.binary.clone(), r.clone())))
        .collect();
    let mut served = 0;
    for f in &functions {
        let Some(service) = service(&f.binary) else {
            assert!(
                f.routes.is_empty(),
                "{} ({}) serves no HTTP routes",
                f.logical_id,
                f.binary
            );
            continue;
        };
        let router = rt.router(service);
        for (owner, r) in &all {
            let shared = r.path == "/health" || r.path == "/openapi.json";
            let expected = *owner == f.binary || shared;
            assert_eq!(
                routed(&router, &r.method, &r.path).await,
                expected,
                "{} {} {} by {}",
                r.method,
                r.path,
                if expected {
                    "not served"
                } else {
                    "also served"
                },
                f.binary
            );
            served += usize::from(expected);
        }
    }
    assert!(served >= 13, "{served}");
    // And the whole router serves every operation the document describes.
    let router = rt.router(Service::All);
    for r in openapi_routes() {
        assert!(routed(&router, &r.method, &r.path).await, "{r:?}");
    }
}

#[test]
fn every_function_is_a_lambda_binary_and_the_authorizer_guards_the_rest() {
    let functions = functions();
    let binaries: BTreeSet<_> = functions.iter().map(|f| f.binary.as_str()).collect();
    for b in &binaries {
        let source = format!("{}/../handlers/src/bin/{b}.rs", env!("CARGO_MANIFEST_DIR"));
        assert!(std::path::Path::new(&source).is_file(), "{b}: no {source}");
    }
    for b in [
        "lambda-auth",
        "lambda-users",
        "lambda-profiles",
        "lambda-documents",
        "lambda-authorizer",
        "lambda-projector",
    ] {
        assert!(binaries.contains(b), "{b} is not deployed");
    }
    let doc = template();
    let auth = &doc["Resources"]["HttpApi"]["Properties"]["Auth"];
    let default = auth["DefaultAuthorizer"]
        .as_str()
        .expect("a default authorizer");
    let authorizer = &auth["Authorizers"][default];
    let target = match &authorizer["FunctionArn"] {
        Yaml::Tagged(t) => t.value.as_str().unwrap_or_default().to_owned(),
        other => panic!("FunctionArn {other:?}"),
    };
    assert!(
        target.starts_with("AuthorizerFunction"),
        "the default authorizer is the authorizer function: {target}"
    );
    let authorizer_fn = functions
        .iter()
        .find(|f| f.logical_id == "AuthorizerFunction")
        .unwrap();
    assert_eq!(authorizer_fn.binary, "lambda-authorizer");
    assert_eq!(
        authorizer["AuthorizerPayloadFormatVersion"].as_str(),
        Some("2.0")
    );
    assert_eq!(authorizer["EnableSimpleResponses"].as_bool(), Some(true));
}
