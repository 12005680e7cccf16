//! TLS to PostgreSQL, with libpq's `sslmode` and `sslrootcert` connection parameters, on rustls
//! (ring provider, the crypto the rest of chunkmill uses).
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and rejects parameters it does
//! not know; [`split`] takes `sslmode` and `sslrootcert` out of the connection string, hands
//! tokio-postgres `disable`, `prefer` or `require`, and the certificate check is chosen here:
//!
//! | sslmode       | TLS                          | certificate check                              |
//! |---------------|------------------------------|------------------------------------------------|
//! | `disable`     | never                        | —                                              |
//! | `prefer` (default) | if the server offers it | none                                           |
//! | `require`     | always                       | none; with `sslrootcert`, as `verify-ca`       |
//! | `verify-ca`   | always                       | chain to the CA file (or system roots)         |
//! | `verify-full` | always                       | chain, and the host name in the certificate    |
//!
//! As in libpq, except: without `sslrootcert` the `verify-*` modes trust the system's roots (libpq
//! reads `~/.postgresql/root.crt`; `sslrootcert=system` is libpq's spelling of this and is
//! accepted), a failed handshake under `prefer` is an error rather than a retry without TLS, and
//! client certificates (`sslcert`, `sslkey`) are not supported.
//!
//! Channel binding is not offered (`ChannelBinding::none()`): SCRAM authentication works without
//! it, `channel_binding=require` does not.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// libpq's `sslmode`, all five the saver supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, without checking its certificate; else plain.
    Prefer,
    /// TLS, without checking the certificate (unless a CA file is given: then as `VerifyCa`).
    Require,
    /// TLS; the certificate chain must lead to a trusted CA. The host name is not checked.
    VerifyCa,
    /// TLS; the chain must lead to a trusted CA and the certificate name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, TlsError> {
        match value {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(TlsError::UnknownMode(other.to_string())),
        }
    }

    /// libpq's name for the mode.
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether to ask for TLS, and whether to insist.
    fn for_client(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
        }
    }
}

/// Where the trusted CAs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The system's trust store (no `sslrootcert`, or `sslrootcert=system`).
    System,
    /// A PEM file of CA certificates (`sslrootcert=/path/ca.pem`).
    File(PathBuf),
}

impl std::fmt::Display for Roots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Roots::System => f.write_str("the system's trusted roots"),
            Roots::File(path) => write!(f, "the CA file {} (sslrootcert)", path.display()),
        }
    }
}

/// The TLS settings of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    /// The mode asked for (`prefer` when the string names none, as in libpq).
    pub mode: SslMode,
    /// `sslrootcert`, if given.
    pub root_cert: Option<Roots>,
}

impl TlsOptions {
    /// The check the certificate gets: `None` for none, else the roots and whether the host name
    /// is checked too.
    fn check(&self) -> Option<(Roots, bool)> {
        match (self.mode, &self.root_cert) {
            (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => None,
            (SslMode::Require | SslMode::VerifyCa, roots) => Some((roots.clone().unwrap_or(Roots::System), false)),
            (SslMode::VerifyFull, roots) => Some((roots.clone().unwrap_or(Roots::System), true)),
        }
    }

    /// `sslmode=verify-full, CA file /x/ca.pem`, for the start-up log.
    pub fn summary(&self) -> String {
        match self.check() {
            None if self.mode == SslMode::Disable => "sslmode=disable (no TLS)".into(),
            None => format!("sslmode={} (the server's certificate is not checked)", self.mode.name()),
            Some((roots, names)) => format!(
                "sslmode={} (certificate chain checked against {roots}{})",
                self.mode.name(),
                if names { ", and the host name" } else { "; host name not checked" }
            ),
        }
    }
}

/// A TLS set-up problem; each says what failed and what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    /// `sslmode` names no mode.
    #[error("sslmode={0} is not a mode the saver knows; use disable, prefer, require, verify-ca or verify-full")]
    UnknownMode(String),
    /// A client-certificate parameter.
    #[error("{0} is not supported: the saver does not present a client certificate; remove it and authenticate with a password (SAVER_PG_PASSWORD_FILE)")]
    ClientCertificate(&'static str),
    /// The CA file cannot be read.
    #[error("cannot read the CA file {path} (sslrootcert): {reason}; check the path and that the saver may read it")]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The CA file holds no usable certificate.
    #[error(
        "the CA file {path} (sslrootcert) {reason}; give a PEM file of CA certificates (-----BEGIN CERTIFICATE-----)"
    )]
    ParseCa {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No system root could be loaded.
    #[error("sslmode={mode} checks the server's certificate, but no trusted root could be loaded from the system ({reason}); name the CA with sslrootcert=/path/ca.pem")]
    NoSystemRoots {
        /// The mode.
        mode: &'static str,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("cannot set up TLS: {0}")]
    Setup(String),
    /// The server's certificate does not lead to a trusted CA (raised during the handshake).
    #[error("certificate verification failed: {reason}, checked against {roots}; check sslrootcert in SAVER_SINK names the CA that signed the server's certificate")]
    Verification {
        /// Why the certificate was refused.
        reason: String,
        /// What it was checked against.
        roots: Roots,
    },
    /// The certificate is trusted but names another host (raised during the handshake).
    #[error("certificate verification failed: the server's certificate is not valid for the host {host} ({reason}); connect by a name or address the certificate lists, or use sslmode=verify-ca to check the chain only")]
    HostName {
        /// The host connected to.
        host: String,
        /// rustls's account, with the names the certificate holds.
        reason: String,
    },
}

/// Takes `sslmode` and `sslrootcert` out of a connection string (`postgres://` URL or libpq
/// `key=value` words): returns the string tokio-postgres is given (with `sslmode` set to what it
/// knows) and the TLS options. A string that does not split is returned as it is, for
/// tokio-postgres to report.
pub fn split(text: &str) -> Result<(String, TlsOptions), TlsError> {
    let mut mode = None;
    let mut root_cert = None;
    let mut take = |key: &str, value: &str| -> Result<bool, TlsError> {
        match key {
            "sslmode" => mode = Some(SslMode::parse(value)?),
            "sslrootcert" if value == "system" => root_cert = Some(Roots::System),
            "sslrootcert" => root_cert = Some(Roots::File(PathBuf::from(value))),
            "sslcert" => return Err(TlsError::ClientCertificate("sslcert")),
            "sslkey" => return Err(TlsError::ClientCertificate("sslkey")),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let url = text.starts_with("postgres://") || text.starts_with("postgresql://");
    let rest = if url {
        split_url(text, &mut take)?
    } else {
        match split_words(text, &mut take)? {
            Some(rest) => rest,
            None => return Ok((text.to_string(), TlsOptions { mode: SslMode::Prefer, root_cert: None })),
        }
    };
    let options = TlsOptions { mode: mode.unwrap_or(SslMode::Prefer), root_cert };
    let sslmode = options.mode.for_client();
    let rest = if url {
        let after_credentials = rest.find('@').map(|at| at + 1).unwrap_or(0);
        format!("{rest}{}sslmode={sslmode}", if rest[after_credentials..].contains('?') { "&" } else { "?" })
    } else {
        format!("{rest} sslmode={sslmode}")
    };
    Ok((rest, options))
}

/// The URL without the parameters `take` keeps. tokio-postgres reads the parameters after the
/// first `?` that follows the first `@` (or the scheme when there is none).
fn split_url(text: &str, take: &mut impl FnMut(&str, &str) -> Result<bool, TlsError>) -> Result<String, TlsError> {
    let after_credentials = text.find('@').map(|at| at + 1).unwrap_or(0);
    let Some(question) = text[after_credentials..].find('?').map(|q| q + after_credentials) else {
        return Ok(text.to_string());
    };
    let mut kept = Vec::new();
    for pair in text[question + 1..].split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !take(&percent_decode(key), &percent_decode(value))? {
            kept.push(pair);
        }
    }
    let base = &text[..question];
    Ok(if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) })
}

/// `%XX` escapes decoded (invalid ones kept as they are).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b))) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// libpq `key=value` words without the ones `take` keeps, re-quoted; `None` if they do not parse
/// (tokio-postgres then says why).
fn split_words(
    text: &str,
    take: &mut impl FnMut(&str, &str) -> Result<bool, TlsError>,
) -> Result<Option<String>, TlsError> {
    let mut kept = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Ok(None);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Ok(None),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Ok(None);
            }
        }
        if !take(&key, &value)? {
            kept.push(format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'")));
        }
    }
    Ok(Some(kept.join(" ")))
}

/// Connects tokio-postgres over rustls, checking the server's certificate as the options say.
/// Cheap to clone.
#[derive(Clone)]
pub struct MakeTls {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for MakeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MakeTls")
    }
}

impl MakeTls {
    /// Builds the TLS client: reads the CA file (or the system roots) now, so a bad file fails
    /// at start.
    pub fn new(options: &TlsOptions) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = match options.check() {
            None => Verifier { inner: None, check_names: false, roots: Roots::System, provider: provider.clone() },
            Some((roots, check_names)) => {
                let store = match &roots {
                    Roots::File(path) => ca_file(path)?,
                    Roots::System => system_roots(options.mode)?,
                };
                let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Setup(e.to_string()))?;
                Verifier { inner: Some(inner), check_names, roots, provider: provider.clone() }
            }
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        // PostgreSQL 17 checks the protocol named in ALPN (libpq 17 sends it); older servers
        // ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(MakeTls { config: Arc::new(config) })
    }
}

/// The certificates of a PEM file, as trust anchors.
fn ca_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|e| TlsError::ReadCa { path: path.into(), reason: e.to_string() })?;
    let parse = |reason: String| TlsError::ParseCa { path: path.into(), reason };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| parse(format!("is not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(parse("holds no certificate".into()));
    }
    let mut store = RootCertStore::empty();
    for cert in certs {
        store.add(cert).map_err(|e| parse(format!("holds a certificate that cannot be a trust anchor ({e})")))?;
    }
    Ok(store)
}

/// The platform's trust store (rustls-native-certs: on Linux, the OpenSSL locations or
/// SSL_CERT_FILE / SSL_CERT_DIR).
fn system_roots(mode: SslMode) -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        let reason = found.errors.first().map(|e| e.to_string()).unwrap_or_else(|| "none found".into());
        return Err(TlsError::NoSystemRoots { mode: mode.name(), reason });
    }
    Ok(store)
}

/// The certificate check: none, chain only (`verify-ca`, or `require` with a CA file), or chain
/// and name (`verify-full`). Handshake signatures are always checked.
#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    check_names: bool,
    roots: Roots,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else { return Ok(ServerCertVerified::assertion()) };
        // webpki checks the name last, after the chain: a name error means the chain is good.
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_names => Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(
                reason @ (CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }),
            )) => Err(certificate_error(TlsError::HostName {
                host: server_name.to_str().into_owned(),
                reason: reason.to_string(),
            })),
            Err(rustls::Error::InvalidCertificate(reason)) => {
                let reason = match reason {
                    CertificateError::UnknownIssuer => "the server's certificate is not signed by a trusted CA".into(),
                    CertificateError::BadSignature => "a signature in the server's certificate chain is wrong".into(),
                    other => other.to_string(),
                };
                Err(certificate_error(TlsError::Verification { reason, roots: self.roots.clone() }))
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The sink's account of a refused certificate. `Error::Other`, not
/// `InvalidCertificate(CertificateError::Other)`, which rustls displays with `Debug`.
fn certificate_error(error: TlsError) -> rustls::Error {
    rustls::Error::Other(rustls::OtherError(Arc::new(error)))
}

impl<S> MakeTlsConnect<S> for MakeTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = Connect;
    type Error = std::convert::Infallible;

    /// Called for every host, TLS or not (a Unix socket's is empty): a host that is no DNS name
    /// or IP address fails only if TLS is attempted.
    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, Self::Error> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| host.to_string());
        Ok(Connect { config: self.config.clone(), name })
    }
}

/// One connection's handshake.
pub struct Connect {
    config: Arc<ClientConfig>,
    name: Result<ServerName<'static>, String>,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, Self::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self
                .name
                .map_err(|host| format!("TLS needs the server's host name or address, and `{host}` is neither"))?;
            let connector = tokio_rustls::TlsConnector::from(self.config);
            match connector.connect(name, stream).await {
                Ok(stream) => Ok(RustlsStream(Box::new(stream))),
                // The rustls error itself, so that the sink can tell a TLS refusal (fatal) from
                // a broken connection (retried).
                Err(e) => {
                    let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).cloned();
                    Err(match tls {
                        Some(tls) => Box::new(tls),
                        None => Box::new(e) as Self::Error,
                    })
                }
            }
        })
    }
}

/// A TLS connection to the server.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_ok(text: &str) -> (String, TlsOptions) {
        split(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn the_five_modes_are_read_and_tokio_postgres_gets_the_three_it_knows() {
        for (mode, expected, client) in [
            ("disable", SslMode::Disable, "disable"),
            ("prefer", SslMode::Prefer, "prefer"),
            ("require", SslMode::Require, "require"),
            ("verify-ca", SslMode::VerifyCa, "require"),
            ("verify-full", SslMode::VerifyFull, "require"),
        ] {
            let (url, options) = split_ok(&format!("postgres://u@h:1/db?sslmode={mode}&connect_timeout=3"));
            assert_eq!(options.mode, expected);
            assert_eq!(url, format!("postgres://u@h:1/db?connect_timeout=3&sslmode={client}"));
            let (words, options) = split_ok(&format!("host=h sslmode={mode} dbname='my db'"));
            assert_eq!(options.mode, expected);
            assert_eq!(words, format!("host='h' dbname='my db' sslmode={client}"));
        }
    }

    #[test]
    fn no_sslmode_means_prefer_as_in_libpq() {
        let (url, options) = split_ok("postgres://u@h/db");
        assert_eq!(options, TlsOptions { mode: SslMode::Prefer, root_cert: None });
        assert_eq!(url, "postgres://u@h/db?sslmode=prefer");
    }

    #[test]
    fn sslrootcert_is_taken_out_and_decoded() {
        let (url, options) = split_ok("postgresql://u:p%3F@h/db?sslrootcert=/etc/ca%20dir/ca.pem&sslmode=verify-full");
        assert_eq!(url, "postgresql://u:p%3F@h/db?sslmode=require");
        assert_eq!(options.root_cert, Some(Roots::File("/etc/ca dir/ca.pem".into())));
        let (_, options) = split_ok("host=h sslrootcert='/a b/c\\'a.pem' sslmode=verify-ca");
        assert_eq!(options.root_cert, Some(Roots::File("/a b/c'a.pem".into())));
        let (_, options) = split_ok("postgres://h/db?sslrootcert=system&sslmode=verify-full");
        assert_eq!(options.root_cert, Some(Roots::System));
    }

    #[test]
    fn the_check_follows_libpq() {
        let check = |mode, root_cert: Option<&str>| {
            TlsOptions { mode, root_cert: root_cert.map(|p| Roots::File(p.into())) }.check()
        };
        assert_eq!(check(SslMode::Prefer, Some("/ca.pem")), None, "prefer never checks, as libpq");
        assert_eq!(check(SslMode::Require, None), None);
        assert_eq!(check(SslMode::Require, Some("/ca.pem")), Some((Roots::File("/ca.pem".into()), false)));
        assert_eq!(check(SslMode::VerifyCa, None), Some((Roots::System, false)));
        assert_eq!(check(SslMode::VerifyFull, Some("/ca.pem")), Some((Roots::File("/ca.pem".into()), true)));
    }

    #[test]
    fn unknown_modes_and_client_certificates_are_refused_clearly() {
        let err = split("postgres://h/db?sslmode=allow").unwrap_err().to_string();
        assert!(err.contains("sslmode=allow") && err.contains("verify-full"), "{err}");
        let err = split("postgres://h/db?sslcert=/c.pem").unwrap_err().to_string();
        assert!(err.contains("sslcert is not supported"), "{err}");
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_named_in_the_error() {
        let options = |path: &Path| TlsOptions { mode: SslMode::VerifyFull, root_cert: Some(Roots::File(path.into())) };
        let err = MakeTls::new(&options(Path::new("/nonexistent/ca.pem"))).unwrap_err().to_string();
        assert!(err.contains("cannot read the CA file /nonexistent/ca.pem (sslrootcert)"), "{err}");
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = MakeTls::new(&options(&empty)).unwrap_err().to_string();
        assert!(err.contains(&format!("the CA file {} (sslrootcert) holds no certificate", empty.display())), "{err}");
    }
}
