//! Where the PostgreSQL sink connects: the connection string (URL or `key=value`), its libpq
//! TLS parameters and a separate password, parsed into tokio-postgres's configuration; and the
//! same string for logs, without its password.

use std::str::FromStr;
use std::time::Duration;

use common::config::Secret;

use super::tls::{self, MakeTls, TlsOptions};
use crate::sink::SinkError;

/// How to reach the database.
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://user@host:port/database?...` (a password in it works but belongs in a file).
    pub url: String,
    /// The password, from `SAVER_PG_PASSWORD_FILE` or `SAVER_PG_PASSWORD`; overrides the URL's.
    pub password: Option<Secret>,
    /// Connections in the pool: batches committed concurrently by this saver.
    pub pool_size: usize,
    /// This saver's instance name, recorded with each chunk it commits.
    pub saver: String,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &redacted(&self.url))
            .field("password", &self.password)
            .field("pool_size", &self.pool_size)
            .field("saver", &self.saver)
            .finish()
    }
}

/// A parsed connection string: tokio-postgres's configuration and the TLS connector its
/// `sslmode` and `sslrootcert` call for.
#[derive(Clone)]
pub struct PgConfig {
    /// Where to connect, as whom (`sslmode` reduced to the three tokio-postgres knows).
    pub config: tokio_postgres::Config,
    /// The TLS settings asked for.
    pub tls_options: TlsOptions,
    /// Connects over TLS with the certificate check `tls_options` ask for.
    pub tls: MakeTls,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("config", &describe(&self.config))
            .field("tls_options", &self.tls_options)
            .finish()
    }
}

/// Parses a connection URL (or `key=value` string) and applies a separate password; reads the
/// CA file of `sslrootcert` (an unreadable one fails here, at start).
pub fn parse(url: &str, password: Option<&str>) -> Result<PgConfig, SinkError> {
    let invalid = |e: &dyn std::fmt::Display| {
        SinkError::Config(format!(
            "the PostgreSQL connection string ({}) is not valid: {e}; write postgres://USER@HOST:PORT/DATABASE",
            redacted(url)
        ))
    };
    let (rest, tls_options) = tls::split(url).map_err(|e| invalid(&e))?;
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| invalid(&e))?;
    let tls =
        MakeTls::new(&tls_options).map_err(|e| SinkError::Config(format!("PostgreSQL {}: {e}", describe(&config))))?;
    if let Some(password) = password {
        config.password(password);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_application_name().is_none() {
        config.application_name("chunkmill-saver");
    }
    Ok(PgConfig { config, tls_options, tls })
}

/// Where a configuration points, without its password: `postgres://user@host:port/database`.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = config.get_ports().get(i).or(config.get_ports().first()).copied().unwrap_or(5432);
            match host {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                tokio_postgres::config::Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or("?"),
        hosts.join(","),
        config.get_dbname().unwrap_or_else(|| config.get_user().unwrap_or("?"))
    )
}

/// A connection string for logs and `Debug`: [`describe`] when it parses, else a placeholder
/// (an unparsable string may hold a password anywhere).
pub fn redacted(url: &str) -> String {
    tls::split(url)
        .ok()
        .and_then(|(rest, _)| tokio_postgres::Config::from_str(&rest).ok())
        .map(|c| describe(&c))
        .unwrap_or_else(|| "<unparsable connection string>".into())
}

/// True for a `postgres://` or `postgresql://` URL.
pub fn is_postgres_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::postgres::SslMode;

    #[test]
    fn descriptions_never_show_the_password() {
        let url = "postgres://chunkmill:s3cret@db.example:6543/pipeline?sslmode=disable";
        assert_eq!(redacted(url), "postgres://chunkmill@db.example:6543/pipeline");
        let config = parse(url, Some("other")).expect("parses");
        assert!(!describe(&config.config).contains("s3cret"));
        let options =
            PgOptions { url: url.into(), password: Some(Secret::new("other")), pool_size: 2, saver: "s".into() };
        let debug = format!("{options:?}");
        assert!(!debug.contains("s3cret") && !debug.contains("other"), "{debug}");
        assert_eq!(redacted("postgres://u:p@[::1"), "<unparsable connection string>");
    }

    #[test]
    fn tls_parameters_reach_the_connector_and_tokio_postgres_gets_what_it_knows() {
        use tokio_postgres::config::SslMode as ClientMode;
        let config = parse("postgres://u:pw@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", None);
        let err = config.expect_err("the CA file is read at start").to_string();
        assert!(err.contains("/nonexistent/ca.pem") && err.contains("postgres://u@h:5432/db"), "{err}");
        assert!(!err.contains("pw"), "{err}");
        let config = parse("postgres://u@h/db?sslmode=require", None).expect("parses");
        assert_eq!(config.config.get_ssl_mode(), ClientMode::Require);
        assert_eq!(config.tls_options, TlsOptions { mode: SslMode::Require, root_cert: None });
        let config = parse("host=h user=u sslmode=disable", None).expect("parses");
        assert_eq!(config.config.get_ssl_mode(), ClientMode::Disable);
        assert_eq!(config.config.get_user(), Some("u"));
        let config = parse("postgres://u@h/db", None).expect("parses");
        assert_eq!(config.config.get_ssl_mode(), ClientMode::Prefer, "libpq's default");
        assert_eq!(
            redacted("postgres://u:s3cret@h/db?sslmode=verify-ca&sslrootcert=/ca.pem"),
            "postgres://u@h:5432/db"
        );
        let err = parse("postgres://u:s3cret@h/db?sslmode=verify", None).unwrap_err().to_string();
        assert!(err.contains("sslmode=verify is not") && !err.contains("s3cret"), "{err}");
    }

    #[test]
    fn a_separate_password_overrides_the_urls() {
        let config = parse("postgres://u:inline@h/db", Some("from-file")).expect("parses");
        assert_eq!(config.config.get_password(), Some(&b"from-file"[..]));
    }
}
