//! Composition: the services a process needs, the one router, and the local server.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::routing::{get, post};
use commands::accounts::Accounts;
use commands::documents::Documents;
use commands::password::{HashingParams, PasswordHasher};
use commands::profiles::Profiles;
use commands::store::PoolSettings;
use commands::{AfterCommit, CommandMeta, Database, NoAfterCommit};
use domain::Email;
use projections::cache::{CacheSettings, CachedProfiles, LocalCache, ProfileCache, RedisCache};
use projections::checkpoint::CheckpointStore;
use projections::documents::{DocumentStore, DocumentsProjection, MongoDocuments, SqlDocuments};
use projections::mongo::{MongoProfiles, MongoSettings};
use projections::provisioner::ProfileProvisioner;
use projections::read_models::{ProfileStore, ProfilesProjection, SqlProfiles, UsersProjection};
use projections::{Projection, Projector, ProjectorSettings, ReadModels};
use secrecy::SecretString;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::info;

use crate::auth::{HmacTokens, SharedVerifier};
use crate::config::Settings;
use crate::problem::ApiError;
use crate::routes;
use crate::throttle::{LoginLimits, LoginThrottle};

/// Everything a handler may use. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: Database,
    pub accounts: Accounts,
    pub profiles: Profiles,
    pub read_models: ReadModels,
    pub profile_reader: Arc<dyn ProfileStore>,
    pub tokens: Arc<HmacTokens>,
    pub verifier: SharedVerifier,
    pub login_throttle: Arc<LoginThrottle>,
    pub documents: Documents,
    pub document_reader: Arc<dyn DocumentStore>,
    pub objects: storage::ObjectStore,
    /// The largest upload accepted (`KARMIC_UPLOAD_MAX_BYTES`).
    pub upload_max_bytes: u64,
}

/// The request id (set by the request-id layer) as command metadata.
pub struct RequestMeta(pub Option<String>);

impl RequestMeta {
    pub fn command(&self) -> CommandMeta {
        CommandMeta {
            request_id: self.0.clone(),
            actor: None,
        }
    }
}

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

impl<S: Send + Sync> FromRequestParts<S> for RequestMeta {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(RequestMeta(
            parts
                .headers
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ))
    }
}

/// Which routes a process serves: all of them (local server) or one Lambda service's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    All,
    Auth,
    Users,
    Profiles,
    Documents,
}

/// The one router. The local server and every Lambda function are built from this.
pub fn router(state: AppState, service: Service, settings: &Settings) -> Router {
    let mut r = Router::new()
        .route("/health", get(routes::health::health))
        .route("/openapi.json", get(crate::openapi::serve));
    if matches!(service, Service::All | Service::Auth) {
        r = r
            .route("/auth/register", post(routes::auth::register))
            .route("/auth/login", post(routes::auth::login));
    }
    if matches!(service, Service::All | Service::Users) {
        r = r
            .route("/users", get(routes::users::list_users))
            .route("/users/{id}", get(routes::users::get_user))
            .route(
                "/admin/events/{aggregate_type}/{aggregate_id}",
                get(routes::audit::aggregate_history),
            );
    }
    if matches!(service, Service::All | Service::Profiles) {
        r = r.route(
            "/profiles/{id}",
            get(routes::profiles::get_profile).put(routes::profiles::put_profile),
        );
    }
    if matches!(service, Service::All | Service::Documents) {
        r = r
            .route("/documents", get(routes::documents::list_documents))
            .route("/documents/upload", post(routes::documents::request_upload))
            .route(
                "/documents/{id}",
                get(routes::documents::get_document).delete(routes::documents::delete_document),
            )
            .route(
                "/documents/{id}/download",
                get(routes::documents::download_document),
            );
    }
    r.fallback(|| async { ApiError::NotFound("no such route".to_owned()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            settings.request_timeout,
            crate::throttle::time_out,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            settings.body_limit_bytes,
        ))
        .layer(cors(settings))
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                axum::response::IntoResponse::into_response(ApiError::Internal(anyhow::anyhow!(
                    "handler panicked"
                )))
            },
        ))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let request_id = req
                .headers()
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            let span = tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
                request_id,
                user_id = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                aws_request_id = tracing::field::Empty,
            );
            // In Lambda: the invocation's X-Ray trace id (API Gateway's `X-Amzn-Trace-Id`
            // otherwise), so that a log line leads to its trace, and the invocation's id.
            let lambda = req.extensions().get::<lambda_http::Context>();
            let trace_id = lambda.and_then(|c| c.xray_trace_id.as_deref()).or_else(|| {
                req.headers()
                    .get("x-amzn-trace-id")
                    .and_then(|v| v.to_str().ok())
            });
            if let Some(id) = trace_id {
                span.record("trace_id", id);
            }
            if let Some(c) = lambda.filter(|c| !c.request_id.is_empty()) {
                span.record("aws_request_id", c.request_id.as_str());
            }
            span
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
}

/// CORS from the validated `KARMIC_CORS_ORIGINS`: a list of origins, or `*` (any origin,
/// and then never credentials: the layer does not allow them either way).
fn cors(settings: &Settings) -> CorsLayer {
    let allow = if settings.cors_any_origin() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            settings
                .cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            REQUEST_ID.clone(),
        ])
        .expose_headers([header::ETAG, header::LOCATION, REQUEST_ID.clone()])
        .max_age(Duration::from_secs(600))
}

/// The services of one process, built from settings: store, projector, application
/// services. Shared by `karmic serve`, the Lambda functions and the CLI.
pub struct Runtime {
    pub settings: Settings,
    pub state: AppState,
    pub projector: Projector,
}

impl Runtime {
    pub async fn build(settings: Settings) -> Result<Runtime> {
        let db = connect(&settings).await?;
        if settings.auto_migrate {
            db.migrate().await?;
        }
        let secret = jwt_secret(&settings)?;
        let params = HashingParams {
            memory_kib: settings.argon2_memory_kib,
            iterations: settings.argon2_iterations,
            parallelism: settings.argon2_parallelism,
        };
        let hasher = match settings.hash_queue {
            None => PasswordHasher::new(params)?,
            Some(queue) => {
                let cpus = std::thread::available_parallelism().map_or(1, usize::from);
                PasswordHasher::with_limits(params, cpus, queue)?
            }
        };
        let bootstrap = settings
            .bootstrap_admin_email
            .as_deref()
            .map(Email::parse)
            .transpose()
            .context("KARMIC_BOOTSTRAP_ADMIN_EMAIL is not a valid email")?;
        // Read models are written (and SQL profiles read) through the projector's pool,
        // which commits asynchronously; events are appended through `db`.
        let projection_db = db.for_projections(settings.projector_max_connections());
        let read_models = ReadModels::new(&db);
        let projected = ReadModels::new(&projection_db);
        // One DocumentDB client (one pool) for every read model kept there.
        let mongo = match &settings.mongodb_url {
            Some(url) => {
                use secrecy::ExposeSecret;
                Some(
                    projections::mongo::connect_database(&MongoSettings {
                        url: url.expose_secret().to_owned(),
                        database: settings.mongodb_database.clone(),
                        tls_ca_file: settings.mongodb_tls_ca_file.clone(),
                        timeout: settings.mongodb_timeout,
                    })
                    .await?,
                )
            }
            None => None,
        };
        let profile_store = profile_store(&settings, mongo.as_ref(), &projected).await?;
        let document_store = document_store(&settings, mongo.as_ref(), &projected).await?;

        // The provisioner issues commands; its own commits need no read-your-writes wait.
        let provisioner_accounts = Accounts::new(
            db.clone(),
            hasher.clone(),
            bootstrap.clone(),
            Arc::new(NoAfterCommit),
        );
        let projections: Vec<Arc<dyn Projection>> = vec![
            Arc::new(UsersProjection(projected)),
            Arc::new(ProfilesProjection(profile_store.clone())),
            Arc::new(ProfileProvisioner(provisioner_accounts)),
            Arc::new(DocumentsProjection(document_store.clone())),
        ];
        let projector = Projector::new(
            projection_db.feed(),
            CheckpointStore::new(&projection_db).with_lease(settings.projection_lease),
            projections,
            ProjectorSettings {
                poll_interval: settings.projection_poll,
                read_your_writes_timeout: settings.read_your_writes,
                ..ProjectorSettings::default()
            },
        );
        if let Err(e) = projector.prime().await {
            tracing::warn!(error = %format!("{e:#}"), "could not read the projection checkpoints at start-up");
        }
        let after_commit: Arc<dyn AfterCommit> = Arc::new(projector.clone());
        let tokens = Arc::new(HmacTokens::new(
            &secret,
            &settings.jwt_issuer,
            &settings.jwt_audience,
            settings.token_ttl,
        ));
        let objects = storage::ObjectStore::connect(&s3_settings(&settings)).await?;
        let state = AppState {
            documents: Documents::new(&db, after_commit.clone(), settings.job_max_attempts),
            document_reader: document_store,
            objects,
            upload_max_bytes: settings.upload_max_bytes,
            accounts: Accounts::new(db.clone(), hasher, bootstrap, after_commit.clone()),
            profiles: Profiles::new(&db, after_commit),
            read_models,
            profile_reader: profile_store,
            verifier: tokens.clone(),
            tokens,
            db,
            login_throttle: Arc::new(LoginThrottle::new(LoginLimits {
                per_account: settings.login_failures_per_account,
                per_client: settings.login_failures_per_client,
                window: settings.login_failure_window,
            })),
        };
        Ok(Runtime {
            settings,
            state,
            projector,
        })
    }

    pub fn router(&self, service: Service) -> Router {
        router(self.state.clone(), service, &self.settings)
    }
}

/// Object storage as configured: S3 (AWS or a stand-in at `KARMIC_S3_ENDPOINT`), or the
/// embedded endpoint `karmic serve` runs on `KARMIC_S3_EMBEDDED_ADDR`.
pub fn s3_settings(settings: &Settings) -> storage::S3Settings {
    let endpoint = settings.s3_endpoint.clone().or_else(|| {
        settings
            .is_embedded()
            .then(|| format!("http://{}", settings.s3_embedded_addr))
    });
    storage::S3Settings {
        force_path_style: endpoint.is_some(),
        endpoint,
        bucket: settings.s3_bucket.clone(),
        region: settings.aws_region.clone(),
        credentials: settings
            .s3_credentials
            .clone()
            .or_else(|| settings.aws_credentials.clone()),
        upload_expiry: settings.upload_url_ttl,
        download_expiry: settings.download_url_ttl,
        timeout: Duration::from_secs(30),
    }
}

/// The documents read model: DocumentDB when configured, else SQL.
async fn document_store(
    settings: &Settings,
    mongo: Option<&mongodb::Database>,
    read_models: &ReadModels,
) -> Result<Arc<dyn DocumentStore>> {
    Ok(match mongo {
        Some(db) => {
            let mongo = MongoDocuments::new(db);
            if settings.auto_migrate {
                mongo.migrate().await?;
            }
            Arc::new(mongo)
        }
        None => Arc::new(SqlDocuments::new(read_models.clone())),
    })
}

/// The profile read model as configured: DocumentDB or SQL, behind Redis, behind an
/// in-process cache (embedded mode only: one process, so its own projector keeps it
/// fresh), or uncached.
async fn profile_store(
    settings: &Settings,
    mongo: Option<&mongodb::Database>,
    read_models: &ReadModels,
) -> Result<Arc<dyn ProfileStore>> {
    use secrecy::ExposeSecret;
    let store: Arc<dyn ProfileStore> = match mongo {
        Some(db) => {
            let mongo = MongoProfiles::new(db.clone());
            if settings.auto_migrate {
                mongo.migrate().await?;
            }
            Arc::new(mongo)
        }
        None => Arc::new(SqlProfiles::new(read_models.clone())),
    };
    let cache_settings = CacheSettings {
        ttl: settings.profile_cache_ttl,
        timeout: settings.redis_timeout,
        near_entries: settings.redis_near_cache_entries,
    };
    let cache: Option<Arc<dyn ProfileCache>> = match &settings.redis_url {
        Some(url) => Some(Arc::new(
            RedisCache::connect(url.expose_secret(), cache_settings).await?,
        )),
        None if settings.is_embedded() => Some(Arc::new(LocalCache::new(
            settings.profile_cache_ttl,
            100_000,
        ))),
        None => None,
    };
    Ok(match cache {
        Some(cache) => Arc::new(CachedProfiles::new(store, cache)),
        None => store,
    })
}

/// The configured event store's pool (the data directory created in embedded mode), not
/// migrated: the CLI's read-only commands (`karmic events …`) use it alone.
pub async fn connect(settings: &Settings) -> Result<Database> {
    if settings.is_embedded() {
        std::fs::create_dir_all(&settings.data_dir).with_context(|| {
            format!(
                "creating the data directory {}",
                settings.data_dir.display()
            )
        })?;
    }
    let pool = PoolSettings {
        max_connections: settings.db_max_connections,
        ..PoolSettings::default()
    };
    Ok(Database::connect(&settings.database_url(), &pool).await?)
}

/// The configured JWT secret; in embedded mode one is generated on first start and kept
/// in the data directory (so tokens survive restarts). Postgres mode refuses to start
/// without one: several processes must share it.
fn jwt_secret(settings: &Settings) -> Result<SecretString> {
    if let Some(s) = &settings.jwt_secret {
        return Ok(s.clone());
    }
    if !settings.is_embedded() {
        anyhow::bail!(
            "KARMIC_JWT_SECRET must be set when KARMIC_DATABASE_URL is (at least 32 bytes)"
        );
    }
    let path = settings.data_dir.join("jwt-secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().to_owned().into()),
        Ok(_) => anyhow::bail!(
            "{} is too short; delete it to have a new one made",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let secret = hex::encode(bytes);
    write_private(&path, &secret)?;
    info!(path = %path.display(), "generated a JWT secret for the embedded configuration");
    Ok(secret.into())
}

fn write_private(path: &std::path::Path, contents: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// The local HTTP server: the router on a TCP listener plus the background projector.
pub struct Application {
    runtime: Runtime,
    listener: TcpListener,
}

impl Application {
    /// Bind the listener (port 0 picks a free port; see [`Application::port`]).
    pub async fn build(settings: Settings) -> Result<Application> {
        let runtime = Runtime::build(settings).await?;
        let listener = TcpListener::bind(runtime.settings.http_addr)
            .await
            .with_context(|| format!("binding {}", runtime.settings.http_addr))?;
        Ok(Application { runtime, listener })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Serve until `shutdown` resolves, then drain in-flight requests and stop the
    /// projector.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let projector = self.runtime.projector.clone();
        let mut rx_proj = rx.clone();
        let proj_task = tokio::spawn(projector.run(async move {
            let _ = rx_proj.wait_for(|s| *s).await;
        }));
        // Catch up at once: events committed while we were down are projected now.
        self.runtime.projector.nudge();
        let mut app = self.runtime.router(Service::All);
        let settings = &self.runtime.settings;
        let limiter =
            crate::throttle::client_limiter(settings.rate_limit_per_sec, settings.rate_limit_burst);
        let mut forget = None;
        if let Some(limiter) = limiter {
            app = app.layer(axum::middleware::from_fn_with_state(
                limiter.clone(),
                crate::throttle::limit_clients,
            ));
            // Forget clients that have been quiet: the table stays as small as the set
            // of active clients.
            forget = Some(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            }));
        }
        info!(addr = %self.listener.local_addr()?, "listening");
        let mut rx_srv = rx;
        let server = axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = rx_srv.wait_for(|s| *s).await;
        });
        let trigger = tokio::spawn(async move {
            shutdown.await;
            info!("shutting down");
            let _ = tx.send(true);
        });
        server.await.context("serving HTTP")?;
        trigger.abort();
        if let Some(f) = forget {
            f.abort();
        }
        let _ = proj_task.await;
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
