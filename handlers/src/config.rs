//! Configuration: defaults, then an optional TOML file (`KARMIC_CONFIG_FILE`), then
//! `KARMIC_*` environment variables. Secrets are wrapped so they never print.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Everything a Karmic process can be told.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the embedded configuration keeps its files (`KARMIC_DATA_DIR`).
    pub data_dir: PathBuf,
    /// Where `karmic serve` listens (`KARMIC_HTTP_ADDR`).
    pub http_addr: SocketAddr,
    /// `postgres://…` selects Postgres; unset selects the embedded SQLite store under
    /// `data_dir` (`KARMIC_DATABASE_URL`). May hold a password, hence secret.
    pub database_url: Option<SecretString>,
    /// HS256 signing secret, at least 32 bytes (`KARMIC_JWT_SECRET`).
    pub jwt_secret: Option<SecretString>,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub token_ttl: Duration,
    /// The email that becomes admin when it registers (`KARMIC_BOOTSTRAP_ADMIN_EMAIL`).
    pub bootstrap_admin_email: Option<String>,
    /// Origins allowed by CORS, e.g. `https://app.example.com` (`KARMIC_CORS_ORIGINS`,
    /// comma-separated). Empty: no cross-origin access.
    pub cors_origins: Vec<String>,
    /// `json` (production) or `pretty` (`KARMIC_LOG_FORMAT`).
    pub log_format: LogFormat,
    /// Largest request body accepted, in bytes (`KARMIC_BODY_LIMIT_BYTES`).
    pub body_limit_bytes: usize,
    pub db_max_connections: u32,
    /// Connections of the projector's own pool on Postgres
    /// (`KARMIC_PROJECTOR_MAX_CONNECTIONS`, default: the smaller of 4 and
    /// `KARMIC_DB_MAX_CONNECTIONS`).
    pub projector_connections: Option<u32>,
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    /// How often the background projector looks for missed events.
    pub projection_poll: Duration,
    /// How long a projection driver's lease lasts (`KARMIC_PROJECTION_LEASE_MS`, default
    /// 5000): the longest a frozen or killed driver can hold a projection up.
    pub projection_lease: Duration,
    /// Password computations accepted at once, queued and running
    /// (`KARMIC_HASH_QUEUE`, default 16 per CPU); beyond it sign-ins get 429.
    pub hash_queue: Option<usize>,
    /// Failed sign-ins allowed per account (`KARMIC_LOGIN_FAILURES_PER_ACCOUNT`, default
    /// 5) and per client address (`KARMIC_LOGIN_FAILURES_PER_CLIENT`, default 20) within
    /// `KARMIC_LOGIN_FAILURE_WINDOW_SECS` (default 300); 0 turns a limit off.
    pub login_failures_per_account: u32,
    pub login_failures_per_client: u32,
    pub login_failure_window: Duration,
    /// Requests per second per client address in `karmic serve`
    /// (`KARMIC_RATE_LIMIT_PER_SEC`, default 10; 0: off) with a burst of
    /// `KARMIC_RATE_LIMIT_BURST` (default 20). In AWS, API Gateway throttles.
    pub rate_limit_per_sec: u32,
    pub rate_limit_burst: u32,
    /// The longest a request may run before it is answered 503
    /// (`KARMIC_REQUEST_TIMEOUT_MS`, default 10000).
    pub request_timeout: Duration,
    /// Apply migrations when the server starts (`KARMIC_AUTO_MIGRATE`, default true).
    pub auto_migrate: bool,
    /// How long a command waits for the read models before answering
    /// (`KARMIC_READ_YOUR_WRITES_MS`, default 2000; 0: never wait, project in the
    /// background only).
    pub read_your_writes: Duration,
    /// DocumentDB/MongoDB for the profile read model (`KARMIC_MONGODB_URL`); unset keeps
    /// profiles in SQL. May hold credentials, hence secret.
    pub mongodb_url: Option<SecretString>,
    pub mongodb_database: String,
    /// CA bundle for DocumentDB's TLS (`KARMIC_MONGODB_TLS_CA_FILE`).
    pub mongodb_tls_ca_file: Option<PathBuf>,
    pub mongodb_timeout: Duration,
    /// Redis in front of profile reads (`KARMIC_REDIS_URL`).
    pub redis_url: Option<SecretString>,
    /// Profile cache TTL, 300 to 600 s (`KARMIC_PROFILE_CACHE_TTL_SECS`).
    pub profile_cache_ttl: Duration,
    /// The longest a request waits on Redis (`KARMIC_REDIS_TIMEOUT_MS`).
    pub redis_timeout: Duration,
    /// Entries of the Redis-invalidated in-process copy of cached profiles, 0 = off
    /// (`KARMIC_REDIS_NEAR_CACHE_ENTRIES`).
    pub redis_near_cache_entries: usize,

    /// The largest upload accepted, in bytes (`KARMIC_UPLOAD_MAX_BYTES`, 25 MiB).
    pub upload_max_bytes: u64,
    /// How long a presigned upload URL works (`KARMIC_UPLOAD_URL_TTL_SECS`, 300).
    pub upload_url_ttl: Duration,
    /// How long a presigned download URL works (`KARMIC_DOWNLOAD_URL_TTL_SECS`, 300).
    pub download_url_ttl: Duration,
    /// The S3 endpoint (`KARMIC_S3_ENDPOINT`); unset: AWS, or in the embedded
    /// configuration the process's own endpoint on `s3_embedded_addr`.
    pub s3_endpoint: Option<String>,
    /// The documents bucket (`KARMIC_S3_BUCKET`).
    pub s3_bucket: String,
    /// Where `karmic serve` runs its own S3 endpoint when embedded
    /// (`KARMIC_S3_EMBEDDED_ADDR`, 127.0.0.1:8081; port 0 picks one).
    pub s3_embedded_addr: SocketAddr,
    /// The AWS region of S3 and SQS (`KARMIC_AWS_REGION`).
    pub aws_region: String,
    /// Static keys for S3 and SQS stand-ins (`KARMIC_AWS_ACCESS_KEY_ID`,
    /// `KARMIC_AWS_SECRET_ACCESS_KEY`); unset in AWS, where the role's credentials are
    /// found by the default chain.
    pub aws_credentials: Option<(String, SecretString)>,
    /// Keys for S3 alone, before `aws_credentials`: the embedded endpoint's, read from
    /// `KARMIC_DATA_DIR/s3-credentials` (never from the environment, and never handed to
    /// SQS).
    pub s3_credentials: Option<(String, SecretString)>,
    /// Secrets Manager secrets to read at start-up instead of values in the environment
    /// (`KARMIC_*_SECRET_ARN`; see `crate::secrets`).
    pub secret_arns: SecretArns,
    /// The Secrets Manager endpoint (`KARMIC_SECRETS_ENDPOINT`); unset: AWS's.
    pub secrets_endpoint: Option<String>,
    /// The SQS endpoint (`KARMIC_SQS_ENDPOINT`); unset: AWS's.
    pub sqs_endpoint: Option<String>,
    /// The queue of storage notifications (`KARMIC_SQS_QUEUE_URL`); unset: the embedded
    /// queue.
    pub sqs_queue_url: Option<String>,
    /// Its dead-letter queue (`KARMIC_SQS_DLQ_URL`); unset: from its redrive policy.
    pub sqs_dlq_url: Option<String>,
    /// Attempts an analysis job gets (`KARMIC_JOB_MAX_ATTEMPTS`, 3). The queue's
    /// `maxReceiveCount` must be one more (see docs/documents.md).
    pub job_max_attempts: u32,
    /// `KARMIC_WORKER_ID` (default `host:pid`).
    pub worker_id: Option<String>,
    /// Messages a worker handles at once (`KARMIC_WORKER_CONCURRENCY`; default two per
    /// CPU within memory, `worker::run::default_concurrency`).
    pub worker_concurrency: Option<usize>,
    /// Long-poll wait (`KARMIC_WORKER_WAIT_SECS`, 20).
    pub worker_wait: Duration,
    /// Visibility timeout per receive and heartbeat (`KARMIC_WORKER_VISIBILITY_SECS`, 600).
    pub worker_visibility: Duration,
    /// Heartbeat interval (`KARMIC_WORKER_HEARTBEAT_SECS`, 60).
    pub worker_heartbeat: Duration,
    /// Grace period after SIGTERM (`KARMIC_WORKER_SHUTDOWN_SECS`, 30).
    pub worker_shutdown_grace: Duration,
    /// First retry delay of a retryable failure (`KARMIC_WORKER_RETRY_DELAY_MS`, 5000).
    pub worker_retry_delay: Duration,
    /// Does `karmic serve` run the worker in-process (`KARMIC_WORKER_IN_PROCESS`;
    /// default: when embedded)?
    pub worker_in_process: Option<bool>,
    /// Wall-clock limit of one analysis (`KARMIC_ANALYZER_TIMEOUT_MS`, 60000).
    pub analyzer_timeout: Duration,
    /// Address-space limit of the analysis child (`KARMIC_ANALYZER_MEMORY_MB`, 1024).
    pub analyzer_memory_mb: u64,
    /// The analysis child program (`KARMIC_ANALYZER_PROGRAM`; default `karmic-analyze`
    /// next to the running executable).
    pub analyzer_program: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// The ARNs (or names) of the Secrets Manager secrets that hold what the environment must
/// not: in AWS a function or the worker is given these, never the secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretArns {
    /// `KARMIC_JWT_SECRET_ARN`: the signing key itself (the secret's string).
    pub jwt: Option<String>,
    /// `KARMIC_DATABASE_SECRET_ARN`: JSON with `username` and `password`, put into
    /// `KARMIC_DATABASE_URL`, which names the host, port and database.
    pub database: Option<String>,
    /// `KARMIC_MONGODB_SECRET_ARN`: the same for `KARMIC_MONGODB_URL`.
    pub mongodb: Option<String>,
    /// `KARMIC_REDIS_SECRET_ARN`: JSON with `password` (the AUTH token) and optionally
    /// `username`, put into `KARMIC_REDIS_URL`.
    pub redis: Option<String>,
}

impl SecretArns {
    pub fn is_empty(&self) -> bool {
        self == &SecretArns::default()
    }
}

/// The file form: every key optional, same names as the variables without `KARMIC_`,
/// lower-cased (`http_addr = "0.0.0.0:8080"`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    data_dir: Option<PathBuf>,
    http_addr: Option<String>,
    database_url: Option<String>,
    jwt_secret: Option<String>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    token_ttl_secs: Option<u64>,
    bootstrap_admin_email: Option<String>,
    cors_origins: Option<Vec<String>>,
    log_format: Option<LogFormat>,
    body_limit_bytes: Option<usize>,
    db_max_connections: Option<u32>,
    projector_max_connections: Option<u32>,
    argon2_memory_kib: Option<u32>,
    argon2_iterations: Option<u32>,
    argon2_parallelism: Option<u32>,
    projection_poll_ms: Option<u64>,
    projection_lease_ms: Option<u64>,
    hash_queue: Option<usize>,
    login_failures_per_account: Option<u32>,
    login_failures_per_client: Option<u32>,
    login_failure_window_secs: Option<u64>,
    rate_limit_per_sec: Option<u32>,
    rate_limit_burst: Option<u32>,
    request_timeout_ms: Option<u64>,
    auto_migrate: Option<bool>,
    read_your_writes_ms: Option<u64>,
    mongodb_url: Option<String>,
    mongodb_database: Option<String>,
    mongodb_tls_ca_file: Option<PathBuf>,
    mongodb_timeout_ms: Option<u64>,
    redis_url: Option<String>,
    profile_cache_ttl_secs: Option<u64>,
    redis_timeout_ms: Option<u64>,
    redis_near_cache_entries: Option<usize>,
    upload_max_bytes: Option<u64>,
    upload_url_ttl_secs: Option<u64>,
    download_url_ttl_secs: Option<u64>,
    s3_endpoint: Option<String>,
    s3_bucket: Option<String>,
    s3_embedded_addr: Option<String>,
    aws_region: Option<String>,
    jwt_secret_arn: Option<String>,
    database_secret_arn: Option<String>,
    mongodb_secret_arn: Option<String>,
    redis_secret_arn: Option<String>,
    secrets_endpoint: Option<String>,
    sqs_endpoint: Option<String>,
    sqs_queue_url: Option<String>,
    sqs_dlq_url: Option<String>,
    job_max_attempts: Option<u32>,
    worker_id: Option<String>,
    worker_concurrency: Option<usize>,
    worker_wait_secs: Option<u64>,
    worker_visibility_secs: Option<u64>,
    worker_heartbeat_secs: Option<u64>,
    worker_shutdown_secs: Option<u64>,
    worker_retry_delay_ms: Option<u64>,
    worker_in_process: Option<bool>,
    analyzer_timeout_ms: Option<u64>,
    analyzer_memory_mb: Option<u64>,
    analyzer_program: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("karmic-data"),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: None,
            jwt_secret: None,
            jwt_issuer: "karmic".to_owned(),
            jwt_audience: "karmic-api".to_owned(),
            token_ttl: Duration::from_secs(3600),
            bootstrap_admin_email: None,
            cors_origins: Vec::new(),
            log_format: LogFormat::Pretty,
            body_limit_bytes: 64 * 1024,
            db_max_connections: 16,
            projector_connections: None,
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            projection_poll: Duration::from_millis(500),
            projection_lease: projections::checkpoint::DEFAULT_LEASE,
            hash_queue: None,
            login_failures_per_account: 5,
            login_failures_per_client: 20,
            login_failure_window: Duration::from_secs(300),
            rate_limit_per_sec: 10,
            rate_limit_burst: 20,
            request_timeout: Duration::from_secs(10),
            auto_migrate: true,
            read_your_writes: Duration::from_secs(2),
            mongodb_url: None,
            mongodb_database: "karmic".to_owned(),
            mongodb_tls_ca_file: None,
            mongodb_timeout: Duration::from_secs(2),
            redis_url: None,
            profile_cache_ttl: Duration::from_secs(300),
            redis_timeout: Duration::from_millis(50),
            redis_near_cache_entries: 10_000,
            upload_max_bytes: 25 << 20,
            upload_url_ttl: Duration::from_secs(300),
            download_url_ttl: Duration::from_secs(300),
            s3_endpoint: None,
            s3_bucket: "karmic-documents".to_owned(),
            s3_embedded_addr: SocketAddr::from(([127, 0, 0, 1], 8081)),
            aws_region: "us-east-1".to_owned(),
            aws_credentials: None,
            s3_credentials: None,
            secret_arns: SecretArns::default(),
            secrets_endpoint: None,
            sqs_endpoint: None,
            sqs_queue_url: None,
            sqs_dlq_url: None,
            job_max_attempts: 3,
            worker_id: None,
            worker_concurrency: None,
            worker_wait: Duration::from_secs(20),
            worker_visibility: Duration::from_secs(600),
            worker_heartbeat: Duration::from_secs(60),
            worker_shutdown_grace: Duration::from_secs(30),
            worker_retry_delay: Duration::from_secs(5),
            worker_in_process: None,
            analyzer_timeout: Duration::from_secs(60),
            analyzer_memory_mb: 1024,
            analyzer_program: None,
        }
    }
}

fn parse<T: std::str::FromStr>(name: &str, v: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    v.trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{name}={v:?} is not valid: {e}"))
}

impl Settings {
    /// Load from the process environment.
    pub fn load() -> Result<Settings> {
        let env: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("KARMIC_"))
            .collect();
        Settings::from_sources(&env)
    }

    /// Load from a given set of variables (tests pass their own).
    pub fn from_sources(env: &HashMap<String, String>) -> Result<Settings> {
        let mut s = Settings::default();
        if let Some(path) = env.get("KARMIC_CONFIG_FILE") {
            s.apply_file(Path::new(path))?;
        }
        s.apply_env(env)?;
        s.validate()?;
        Ok(s)
    }

    fn apply_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading configuration file {}", path.display()))?;
        let f: FileSettings = toml::from_str(&text)
            .with_context(|| format!("parsing configuration file {}", path.display()))?;
        if let Some(v) = f.data_dir {
            self.data_dir = v;
        }
        if let Some(v) = f.http_addr {
            self.http_addr = parse("http_addr", &v)?;
        }
        if let Some(v) = f.database_url {
            self.database_url = Some(v.into());
        }
        if let Some(v) = f.jwt_secret {
            self.jwt_secret = Some(v.into());
        }
        if let Some(v) = f.jwt_issuer {
            self.jwt_issuer = v;
        }
        if let Some(v) = f.jwt_audience {
            self.jwt_audience = v;
        }
        if let Some(v) = f.token_ttl_secs {
            self.token_ttl = Duration::from_secs(v);
        }
        if let Some(v) = f.bootstrap_admin_email {
            self.bootstrap_admin_email = Some(v);
        }
        if let Some(v) = f.cors_origins {
            self.cors_origins = v;
        }
        if let Some(v) = f.log_format {
            self.log_format = v;
        }
        if let Some(v) = f.body_limit_bytes {
            self.body_limit_bytes = v;
        }
        if let Some(v) = f.db_max_connections {
            self.db_max_connections = v;
        }
        if let Some(v) = f.projector_max_connections {
            self.projector_connections = Some(v);
        }
        if let Some(v) = f.argon2_memory_kib {
            self.argon2_memory_kib = v;
        }
        if let Some(v) = f.argon2_iterations {
            self.argon2_iterations = v;
        }
        if let Some(v) = f.argon2_parallelism {
            self.argon2_parallelism = v;
        }
        if let Some(v) = f.projection_poll_ms {
            self.projection_poll = Duration::from_millis(v);
        }
        if let Some(v) = f.projection_lease_ms {
            self.projection_lease = Duration::from_millis(v);
        }
        if let Some(v) = f.hash_queue {
            self.hash_queue = Some(v);
        }
        if let Some(v) = f.login_failures_per_account {
            self.login_failures_per_account = v;
        }
        if let Some(v) = f.login_failures_per_client {
            self.login_failures_per_client = v;
        }
        if let Some(v) = f.login_failure_window_secs {
            self.login_failure_window = Duration::from_secs(v);
        }
        if let Some(v) = f.rate_limit_per_sec {
            self.rate_limit_per_sec = v;
        }
        if let Some(v) = f.rate_limit_burst {
            self.rate_limit_burst = v;
        }
        if let Some(v) = f.request_timeout_ms {
            self.request_timeout = Duration::from_millis(v);
        }
        if let Some(v) = f.auto_migrate {
            self.auto_migrate = v;
        }
        if let Some(v) = f.read_your_writes_ms {
            self.read_your_writes = Duration::from_millis(v);
        }
        if let Some(v) = f.mongodb_url {
            self.mongodb_url = Some(v.into());
        }
        if let Some(v) = f.mongodb_database {
            self.mongodb_database = v;
        }
        if let Some(v) = f.mongodb_tls_ca_file {
            self.mongodb_tls_ca_file = Some(v);
        }
        if let Some(v) = f.mongodb_timeout_ms {
            self.mongodb_timeout = Duration::from_millis(v);
        }
        if let Some(v) = f.redis_url {
            self.redis_url = Some(v.into());
        }
        if let Some(v) = f.profile_cache_ttl_secs {
            self.profile_cache_ttl = Duration::from_secs(v);
        }
        if let Some(v) = f.redis_timeout_ms {
            self.redis_timeout = Duration::from_millis(v);
        }
        if let Some(v) = f.redis_near_cache_entries {
            self.redis_near_cache_entries = v;
        }
        if let Some(v) = f.upload_max_bytes {
            self.upload_max_bytes = v;
        }
        if let Some(v) = f.upload_url_ttl_secs {
            self.upload_url_ttl = Duration::from_secs(v);
        }
        if let Some(v) = f.download_url_ttl_secs {
            self.download_url_ttl = Duration::from_secs(v);
        }
        if let Some(v) = f.s3_endpoint {
            self.s3_endpoint = Some(v);
        }
        if let Some(v) = f.s3_bucket {
            self.s3_bucket = v;
        }
        if let Some(v) = f.s3_embedded_addr {
            self.s3_embedded_addr = parse("s3_embedded_addr", &v)?;
        }
        if let Some(v) = f.aws_region {
            self.aws_region = v;
        }
        if let Some(v) = f.jwt_secret_arn {
            self.secret_arns.jwt = Some(v);
        }
        if let Some(v) = f.database_secret_arn {
            self.secret_arns.database = Some(v);
        }
        if let Some(v) = f.mongodb_secret_arn {
            self.secret_arns.mongodb = Some(v);
        }
        if let Some(v) = f.redis_secret_arn {
            self.secret_arns.redis = Some(v);
        }
        if let Some(v) = f.secrets_endpoint {
            self.secrets_endpoint = Some(v);
        }
        if let Some(v) = f.sqs_endpoint {
            self.sqs_endpoint = Some(v);
        }
        if let Some(v) = f.sqs_queue_url {
            self.sqs_queue_url = Some(v);
        }
        if let Some(v) = f.sqs_dlq_url {
            self.sqs_dlq_url = Some(v);
        }
        if let Some(v) = f.job_max_attempts {
            self.job_max_attempts = v;
        }
        if let Some(v) = f.worker_id {
            self.worker_id = Some(v);
        }
        if let Some(v) = f.worker_concurrency {
            self.worker_concurrency = Some(v);
        }
        if let Some(v) = f.worker_wait_secs {
            self.worker_wait = Duration::from_secs(v);
        }
        if let Some(v) = f.worker_visibility_secs {
            self.worker_visibility = Duration::from_secs(v);
        }
        if let Some(v) = f.worker_heartbeat_secs {
            self.worker_heartbeat = Duration::from_secs(v);
        }
        if let Some(v) = f.worker_shutdown_secs {
            self.worker_shutdown_grace = Duration::from_secs(v);
        }
        if let Some(v) = f.worker_retry_delay_ms {
            self.worker_retry_delay = Duration::from_millis(v);
        }
        if let Some(v) = f.worker_in_process {
            self.worker_in_process = Some(v);
        }
        if let Some(v) = f.analyzer_timeout_ms {
            self.analyzer_timeout = Duration::from_millis(v);
        }
        if let Some(v) = f.analyzer_memory_mb {
            self.analyzer_memory_mb = v;
        }
        if let Some(v) = f.analyzer_program {
            self.analyzer_program = Some(v);
        }
        Ok(())
    }

    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<()> {
        let get = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.is_empty());
        if let Some(v) = get("KARMIC_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("KARMIC_HTTP_ADDR") {
            self.http_addr = parse("KARMIC_HTTP_ADDR", v)?;
        }
        if let Some(v) = get("KARMIC_DATABASE_URL") {
            self.database_url = Some(v.to_owned().into());
        }
        if let Some(v) = get("KARMIC_JWT_SECRET") {
            self.jwt_secret = Some(v.to_owned().into());
        }
        if let Some(v) = get("KARMIC_JWT_ISSUER") {
            self.jwt_issuer = v.to_owned();
        }
        if let Some(v) = get("KARMIC_JWT_AUDIENCE") {
            self.jwt_audience = v.to_owned();
        }
        if let Some(v) = get("KARMIC_TOKEN_TTL_SECS") {
            self.token_ttl = Duration::from_secs(parse("KARMIC_TOKEN_TTL_SECS", v)?);
        }
        if let Some(v) = get("KARMIC_BOOTSTRAP_ADMIN_EMAIL") {
            self.bootstrap_admin_email = Some(v.to_owned());
        }
        if let Some(v) = get("KARMIC_CORS_ORIGINS") {
            self.cors_origins = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(v) = get("KARMIC_LOG_FORMAT") {
            self.log_format = match v {
                "json" => LogFormat::Json,
                "pretty" => LogFormat::Pretty,
                other => bail!("KARMIC_LOG_FORMAT={other:?}: expected json or pretty"),
            };
        }
        if let Some(v) = get("KARMIC_BODY_LIMIT_BYTES") {
            self.body_limit_bytes = parse("KARMIC_BODY_LIMIT_BYTES", v)?;
        }
        if let Some(v) = get("KARMIC_DB_MAX_CONNECTIONS") {
            self.db_max_connections = parse("KARMIC_DB_MAX_CONNECTIONS", v)?;
        }
        if let Some(v) = get("KARMIC_PROJECTOR_MAX_CONNECTIONS") {
            self.projector_connections = Some(parse("KARMIC_PROJECTOR_MAX_CONNECTIONS", v)?);
        }
        if let Some(v) = get("KARMIC_ARGON2_MEMORY_KIB") {
            self.argon2_memory_kib = parse("KARMIC_ARGON2_MEMORY_KIB", v)?;
        }
        if let Some(v) = get("KARMIC_ARGON2_ITERATIONS") {
            self.argon2_iterations = parse("KARMIC_ARGON2_ITERATIONS", v)?;
        }
        if let Some(v) = get("KARMIC_ARGON2_PARALLELISM") {
            self.argon2_parallelism = parse("KARMIC_ARGON2_PARALLELISM", v)?;
        }
        if let Some(v) = get("KARMIC_PROJECTION_POLL_MS") {
            self.projection_poll = Duration::from_millis(parse("KARMIC_PROJECTION_POLL_MS", v)?);
        }
        if let Some(v) = get("KARMIC_PROJECTION_LEASE_MS") {
            self.projection_lease = Duration::from_millis(parse("KARMIC_PROJECTION_LEASE_MS", v)?);
        }
        if let Some(v) = get("KARMIC_HASH_QUEUE") {
            self.hash_queue = Some(parse("KARMIC_HASH_QUEUE", v)?);
        }
        if let Some(v) = get("KARMIC_LOGIN_FAILURES_PER_ACCOUNT") {
            self.login_failures_per_account = parse("KARMIC_LOGIN_FAILURES_PER_ACCOUNT", v)?;
        }
        if let Some(v) = get("KARMIC_LOGIN_FAILURES_PER_CLIENT") {
            self.login_failures_per_client = parse("KARMIC_LOGIN_FAILURES_PER_CLIENT", v)?;
        }
        if let Some(v) = get("KARMIC_LOGIN_FAILURE_WINDOW_SECS") {
            self.login_failure_window =
                Duration::from_secs(parse("KARMIC_LOGIN_FAILURE_WINDOW_SECS", v)?);
        }
        if let Some(v) = get("KARMIC_RATE_LIMIT_PER_SEC") {
            self.rate_limit_per_sec = parse("KARMIC_RATE_LIMIT_PER_SEC", v)?;
        }
        if let Some(v) = get("KARMIC_RATE_LIMIT_BURST") {
            self.rate_limit_burst = parse("KARMIC_RATE_LIMIT_BURST", v)?;
        }
        if let Some(v) = get("KARMIC_REQUEST_TIMEOUT_MS") {
            self.request_timeout = Duration::from_millis(parse("KARMIC_REQUEST_TIMEOUT_MS", v)?);
        }
        if let Some(v) = get("KARMIC_AUTO_MIGRATE") {
            self.auto_migrate = parse("KARMIC_AUTO_MIGRATE", v)?;
        }
        if let Some(v) = get("KARMIC_READ_YOUR_WRITES_MS") {
            self.read_your_writes = Duration::from_millis(parse("KARMIC_READ_YOUR_WRITES_MS", v)?);
        }
        if let Some(v) = get("KARMIC_MONGODB_URL") {
            self.mongodb_url = Some(v.to_owned().into());
        }
        if let Some(v) = get("KARMIC_MONGODB_DATABASE") {
            self.mongodb_database = v.to_owned();
        }
        if let Some(v) = get("KARMIC_MONGODB_TLS_CA_FILE") {
            self.mongodb_tls_ca_file = Some(PathBuf::from(v));
        }
        if let Some(v) = get("KARMIC_MONGODB_TIMEOUT_MS") {
            self.mongodb_timeout = Duration::from_millis(parse("KARMIC_MONGODB_TIMEOUT_MS", v)?);
        }
        if let Some(v) = get("KARMIC_REDIS_URL") {
            self.redis_url = Some(v.to_owned().into());
        }
        if let Some(v) = get("KARMIC_PROFILE_CACHE_TTL_SECS") {
            self.profile_cache_ttl =
                Duration::from_secs(parse("KARMIC_PROFILE_CACHE_TTL_SECS", v)?);
        }
        if let Some(v) = get("KARMIC_REDIS_TIMEOUT_MS") {
            self.redis_timeout = Duration::from_millis(parse("KARMIC_REDIS_TIMEOUT_MS", v)?);
        }
        if let Some(v) = get("KARMIC_REDIS_NEAR_CACHE_ENTRIES") {
            self.redis_near_cache_entries = parse("KARMIC_REDIS_NEAR_CACHE_ENTRIES", v)?;
        }
        let secs = |name: &str, v: &str| parse(name, v).map(Duration::from_secs);
        let millis = |name: &str, v: &str| parse(name, v).map(Duration::from_millis);
        if let Some(v) = get("KARMIC_UPLOAD_MAX_BYTES") {
            self.upload_max_bytes = parse("KARMIC_UPLOAD_MAX_BYTES", v)?;
        }
        if let Some(v) = get("KARMIC_UPLOAD_URL_TTL_SECS") {
            self.upload_url_ttl = secs("KARMIC_UPLOAD_URL_TTL_SECS", v)?;
        }
        if let Some(v) = get("KARMIC_DOWNLOAD_URL_TTL_SECS") {
            self.download_url_ttl = secs("KARMIC_DOWNLOAD_URL_TTL_SECS", v)?;
        }
        if let Some(v) = get("KARMIC_S3_ENDPOINT") {
            self.s3_endpoint = Some(v.to_owned());
        }
        if let Some(v) = get("KARMIC_S3_BUCKET") {
            self.s3_bucket = v.to_owned();
        }
        if let Some(v) = get("KARMIC_S3_EMBEDDED_ADDR") {
            self.s3_embedded_addr = parse("KARMIC_S3_EMBEDDED_ADDR", v)?;
        }
        if let Some(v) = get("KARMIC_AWS_REGION") {
            self.aws_region = v.to_owned();
        }
        match (
            get("KARMIC_AWS_ACCESS_KEY_ID"),
            get("KARMIC_AWS_SECRET_ACCESS_KEY"),
        ) {
            (Some(k), Some(s)) => self.aws_credentials = Some((k.to_owned(), s.to_owned().into())),
            (None, None) => {}
            _ => bail!(
                "KARMIC_AWS_ACCESS_KEY_ID and KARMIC_AWS_SECRET_ACCESS_KEY go together (or neither: the default AWS credential chain)"
            ),
        }
        if let Some(v) = get("KARMIC_JWT_SECRET_ARN") {
            self.secret_arns.jwt = Some(v.to_owned());
        }
        if let Some(v) = get("KARMIC_DATABASE_SECRET_ARN") {
            self.secret_arns.database = Some(v.to_owned());
        }
        if let Some(v) = get("KARMIC_MONGODB_SECRET_ARN") {
            self.secret_arns.mongodb = Some(v.to_owned());
        }
        if let Some(v) = get("KARMIC_REDIS_SECRET_ARN") {
            self.secret_arns.redis = Some(v.to_owned());
        }
        if let Some(v) = get("KARMIC_SECRETS_ENDPOINT") {
            self.secrets_endpoint = Some(v.to_owned());
        }
        if let Some(v) = get("KARMIC_SQS_ENDPOINT") {
            self.sqs_endpoint = Some(v.to_owned());
        }
        if let Some(v) = get("KARMIC_SQS_QUEUE_URL") {
            self.sqs_queue_url = Some(v.to_owned());
        }
        if let Some(v) = get("KARMIC_SQS_DLQ_URL") {
            self.sqs_dlq_url = Some(v.to_owned());
        }
        if let Some(v) = get("KARMIC_JOB_MAX_ATTEMPTS") {
            self.job_max_attempts = parse("KARMIC_JOB_MAX_ATTEMPTS", v)?;
        }
        if let Some(v) = get("KARMIC_WORKER_ID") {
            self.worker_id = Some(v.to_owned());
        }
        if let Some(v) = get("KARMIC_WORKER_CONCURRENCY") {
            self.worker_concurrency = Some(parse("KARMIC_WORKER_CONCURRENCY", v)?);
        }
        if let Some(v) = get("KARMIC_WORKER_WAIT_SECS") {
            self.worker_wait = secs("KARMIC_WORKER_WAIT_SECS", v)?;
        }
        if let Some(v) = get("KARMIC_WORKER_VISIBILITY_SECS") {
            self.worker_visibility = secs("KARMIC_WORKER_VISIBILITY_SECS", v)?;
        }
        if let Some(v) = get("KARMIC_WORKER_HEARTBEAT_SECS") {
            self.worker_heartbeat = secs("KARMIC_WORKER_HEARTBEAT_SECS", v)?;
        }
        if let Some(v) = get("KARMIC_WORKER_SHUTDOWN_SECS") {
            self.worker_shutdown_grace = secs("KARMIC_WORKER_SHUTDOWN_SECS", v)?;
        }
        if let Some(v) = get("KARMIC_WORKER_RETRY_DELAY_MS") {
            self.worker_retry_delay = millis("KARMIC_WORKER_RETRY_DELAY_MS", v)?;
        }
        if let Some(v) = get("KARMIC_WORKER_IN_PROCESS") {
            self.worker_in_process = Some(parse("KARMIC_WORKER_IN_PROCESS", v)?);
        }
        if let Some(v) = get("KARMIC_ANALYZER_TIMEOUT_MS") {
            self.analyzer_timeout = millis("KARMIC_ANALYZER_TIMEOUT_MS", v)?;
        }
        if let Some(v) = get("KARMIC_ANALYZER_MEMORY_MB") {
            self.analyzer_memory_mb = parse("KARMIC_ANALYZER_MEMORY_MB", v)?;
        }
        if let Some(v) = get("KARMIC_ANALYZER_PROGRAM") {
            self.analyzer_program = Some(PathBuf::from(v));
        }
        Ok(())
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let arns = &self.secret_arns;
        if arns.jwt.is_some() && self.jwt_secret.is_some() {
            bail!("set KARMIC_JWT_SECRET or KARMIC_JWT_SECRET_ARN, not both");
        }
        for (arn, url, names) in [
            (
                &arns.database,
                self.database_url.is_some(),
                "KARMIC_DATABASE_SECRET_ARN needs KARMIC_DATABASE_URL",
            ),
            (
                &arns.mongodb,
                self.mongodb_url.is_some(),
                "KARMIC_MONGODB_SECRET_ARN needs KARMIC_MONGODB_URL",
            ),
            (
                &arns.redis,
                self.redis_url.is_some(),
                "KARMIC_REDIS_SECRET_ARN needs KARMIC_REDIS_URL",
            ),
        ] {
            if arn.is_some() && !url {
                bail!("{names} (the host, port and options; the secret brings the credentials)");
            }
        }
        if let Some(s) = &self.jwt_secret
            && s.expose_secret().len() < 32
        {
            bail!("KARMIC_JWT_SECRET must be at least 32 bytes");
        }
        if let Some(url) = &self.database_url {
            let u = url.expose_secret();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                bail!(
                    "KARMIC_DATABASE_URL must be a postgres:// URL (unset it for the embedded store)"
                );
            }
        }
        if self.body_limit_bytes < 1024 {
            bail!("KARMIC_BODY_LIMIT_BYTES must be at least 1024");
        }
        if !(300..=600).contains(&self.profile_cache_ttl.as_secs()) {
            bail!("KARMIC_PROFILE_CACHE_TTL_SECS must be between 300 and 600 (5 to 10 minutes)");
        }
        if self.redis_timeout.is_zero() || self.redis_timeout > Duration::from_secs(5) {
            bail!("KARMIC_REDIS_TIMEOUT_MS must be between 1 and 5000");
        }
        if let Some(u) = &self.mongodb_url
            && !u.expose_secret().starts_with("mongodb://")
        {
            bail!("KARMIC_MONGODB_URL must be a mongodb:// URL");
        }
        if let Some(u) = &self.redis_url
            && !(u.expose_secret().starts_with("redis://")
                || u.expose_secret().starts_with("rediss://"))
        {
            bail!("KARMIC_REDIS_URL must be a redis:// or rediss:// URL");
        }
        if self.projection_lease < Duration::from_millis(100) {
            bail!("KARMIC_PROJECTION_LEASE_MS must be at least 100");
        }
        validate_cors_origins(&self.cors_origins)?;
        if self.request_timeout < Duration::from_millis(100) {
            bail!("KARMIC_REQUEST_TIMEOUT_MS must be at least 100");
        }
        if self.hash_queue == Some(0) {
            bail!("KARMIC_HASH_QUEUE must be at least 1");
        }
        if self.db_max_connections == 0 {
            bail!("KARMIC_DB_MAX_CONNECTIONS must be at least 1");
        }
        if self.projector_connections == Some(0) {
            bail!("KARMIC_PROJECTOR_MAX_CONNECTIONS must be at least 1");
        }
        if self.token_ttl < Duration::from_secs(60) {
            bail!("KARMIC_TOKEN_TTL_SECS must be at least 60");
        }
        if self.upload_max_bytes == 0 || self.upload_max_bytes > 5 << 30 {
            bail!("KARMIC_UPLOAD_MAX_BYTES must be between 1 and 5 GiB (one S3 PUT)");
        }
        // SigV4 presigned URLs last at most 7 days.
        for (name, ttl) in [
            ("KARMIC_UPLOAD_URL_TTL_SECS", self.upload_url_ttl),
            ("KARMIC_DOWNLOAD_URL_TTL_SECS", self.download_url_ttl),
        ] {
            if ttl.is_zero() || ttl > Duration::from_secs(7 * 24 * 3600) {
                bail!("{name} must be between 1 and 604800");
            }
        }
        if self.s3_bucket.is_empty() {
            bail!("KARMIC_S3_BUCKET must not be empty");
        }
        if !(1..=100).contains(&self.job_max_attempts) {
            bail!("KARMIC_JOB_MAX_ATTEMPTS must be between 1 and 100");
        }
        if self.worker_concurrency == Some(0) {
            bail!("KARMIC_WORKER_CONCURRENCY must be at least 1");
        }
        if self.worker_wait > Duration::from_secs(20) {
            bail!("KARMIC_WORKER_WAIT_SECS must be at most 20 (SQS's longest poll)");
        }
        if self.worker_visibility.is_zero() || self.worker_visibility > Duration::from_secs(43_200)
        {
            bail!("KARMIC_WORKER_VISIBILITY_SECS must be between 1 and 43200 (SQS's range)");
        }
        if self.worker_heartbeat.is_zero() || self.worker_heartbeat >= self.worker_visibility {
            bail!(
                "KARMIC_WORKER_HEARTBEAT_SECS must be at least 1 and less than KARMIC_WORKER_VISIBILITY_SECS"
            );
        }
        if self.analyzer_timeout < Duration::from_millis(100) {
            bail!("KARMIC_ANALYZER_TIMEOUT_MS must be at least 100");
        }
        if self.analyzer_memory_mb < 64 {
            bail!("KARMIC_ANALYZER_MEMORY_MB must be at least 64");
        }
        Ok(())
    }

    /// The projector pool's size (Postgres).
    pub fn projector_max_connections(&self) -> u32 {
        self.projector_connections
            .unwrap_or_else(|| self.db_max_connections.min(4))
    }

    /// Does CORS allow any origin (`KARMIC_CORS_ORIGINS=*`)? Never with credentials.
    pub fn cors_any_origin(&self) -> bool {
        self.cors_origins.iter().any(|o| o == "*")
    }

    /// Is this the embedded (single-process, local files) configuration?
    pub fn is_embedded(&self) -> bool {
        self.database_url.is_none()
    }

    /// The database URL to connect to: the configured Postgres or the embedded SQLite file.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(u) => u.expose_secret().to_owned(),
            None => format!("sqlite://{}", self.data_dir.join("karmic.db").display()),
        }
    }

    /// A summary safe to log: no secrets, no passwords in URLs.
    pub fn redacted_summary(&self) -> String {
        let store = if self.is_embedded() {
            format!("sqlite ({})", self.data_dir.display())
        } else {
            "postgres".to_owned()
        };
        format!(
            "store={store} http_addr={} jwt_secret={} cors_origins={:?}",
            self.http_addr,
            if self.jwt_secret.is_some() {
                "set"
            } else {
                "unset"
            },
            self.cors_origins
        )
    }
}

/// `*` alone, or origins exactly as browsers send them (`scheme://host[:port]`, no path,
/// no trailing slash). Anything else is refused at start-up rather than silently ignored.
fn validate_cors_origins(origins: &[String]) -> Result<()> {
    if origins.iter().any(|o| o == "*") {
        if origins.len() > 1 {
            bail!(
                "KARMIC_CORS_ORIGINS: `*` allows every origin and cannot be combined with others"
            );
        }
        return Ok(());
    }
    for o in origins {
        let parsed = url::Url::parse(o).map_err(|e| {
            anyhow::anyhow!("KARMIC_CORS_ORIGINS: {o:?} is not an origin ({e}); expected e.g. https://app.example.com")
        })?;
        let canonical = parsed.origin().ascii_serialization();
        if !matches!(parsed.scheme(), "http" | "https") || canonical != *o {
            bail!(
                "KARMIC_CORS_ORIGINS: {o:?} is not an origin as browsers send it; expected {canonical:?} (scheme://host[:port], no path or trailing slash)"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_select_the_embedded_store_on_localhost_8080() {
        let s = Settings::from_sources(&env(&[])).unwrap();
        assert!(s.is_embedded());
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:8080");
        assert!(s.database_url().starts_with("sqlite://karmic-data"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("karmic-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("karmic.toml");
        std::fs::write(
            &file,
            "http_addr = \"127.0.0.1:9000\"\njwt_issuer = \"from-file\"\n",
        )
        .unwrap();
        let s = Settings::from_sources(&env(&[
            ("KARMIC_CONFIG_FILE", file.to_str().unwrap()),
            ("KARMIC_HTTP_ADDR", "127.0.0.1:9100"),
        ]))
        .unwrap();
        assert_eq!(s.http_addr.port(), 9100);
        assert_eq!(s.jwt_issuer, "from-file");
    }

    #[test]
    fn secrets_never_print() {
        let s = Settings::from_sources(&env(&[
            (
                "KARMIC_JWT_SECRET",
                "a-very-secret-value-that-is-long-enough",
            ),
            ("KARMIC_DATABASE_URL", "postgres://u:hunter2hunter2@db/x"),
        ]))
        .unwrap();
        let shown = format!("{s:?} {}", s.redacted_summary());
        assert!(!shown.contains("a-very-secret-value"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn short_secrets_and_foreign_urls_are_refused() {
        assert!(Settings::from_sources(&env(&[("KARMIC_JWT_SECRET", "short")])).is_err());
        assert!(Settings::from_sources(&env(&[("KARMIC_DATABASE_URL", "mysql://x")])).is_err());
        assert!(Settings::from_sources(&env(&[("KARMIC_HTTP_ADDR", "nope")])).is_err());
    }
}
