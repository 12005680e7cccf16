//! The jobs a mapper has met, by fingerprint: asked of the fetcher once (`<prefix>.job`), built
//! once (a compiled jq program, a pool of command children), then shared by every chunk of the
//! run. A mapper never decides what a job is; it only says what it can run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use common::protocol::{self, JobReply, JobRequest, VERSION};
use common::text::escaped;
use tokio::sync::Mutex;
use transform::{Job, Registry, Transform};

/// Jobs kept at once; a mapper meets one per run, so this only bounds a misbehaving fetcher.
const KEPT: usize = 8;

/// A job ready to run.
pub struct Built {
    /// The job.
    pub job: Job,
    /// Its transform.
    pub transform: Arc<dyn Transform>,
}

/// Why a job cannot run here.
#[derive(Debug, Clone)]
pub enum Unusable {
    /// The fetcher did not tell us (yet): hand the chunk back, not its fault.
    Unknown(String),
    /// We cannot build it (a command that does not start, a transform we lack).
    CannotRun(String),
}

/// The jobs met so far.
pub struct Jobs {
    registry: Registry,
    built: Mutex<HashMap<String, Result<Arc<Built>, String>>>,
}

impl Jobs {
    /// No job yet; `registry` says what can be built.
    pub fn new(registry: Registry) -> Self {
        Jobs { registry, built: Mutex::new(HashMap::new()) }
    }

    /// What this mapper offers.
    pub fn capabilities(&self) -> Vec<String> {
        self.registry.capabilities()
    }

    /// The job with `fingerprint`, asking the fetcher for it the first time.
    pub async fn get(
        &self,
        client: &Client,
        subject: &str,
        name: &str,
        fingerprint: &str,
    ) -> Result<Arc<Built>, Unusable> {
        let mut built = self.built.lock().await;
        if let Some(known) = built.get(fingerprint) {
            return known.clone().map_err(Unusable::CannotRun);
        }
        let reply = ask(client, subject, name).await.map_err(Unusable::Unknown)?;
        if reply.job != fingerprint {
            // The fetcher now serves another run: this chunk's job is gone with it.
            return Err(Unusable::Unknown(format!(
                "the fetcher's job is {} now, not {fingerprint}",
                escaped(&reply.job)
            )));
        }
        let job: Job = serde_json::from_value(reply.spec).map_err(|e| {
            Unusable::CannotRun(format!("the job {fingerprint} is not one this mapper understands: {e}"))
        })?;
        if job.fingerprint() != fingerprint {
            return Err(Unusable::CannotRun(format!(
                "the job {fingerprint} does not match its own fingerprint here ({}): a fetcher of another version?",
                job.fingerprint()
            )));
        }
        let registry = self.registry.clone();
        let spec = job.transform.clone();
        // Building may start child processes or compile a program: not on tokio's thread.
        let outcome = tokio::task::spawn_blocking(move || registry.build(&spec))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let entry = match outcome {
            Ok(transform) => {
                tracing::info!("job {fingerprint}: {}", job.describe());
                Ok(Arc::new(Built { job, transform }))
            }
            Err(e) => {
                tracing::error!("cannot run job {fingerprint} ({}): {e}", job.describe());
                Err(e)
            }
        };
        if built.len() >= KEPT {
            built.clear();
        }
        built.insert(fingerprint.to_string(), entry.clone());
        entry.map_err(Unusable::CannotRun)
    }
}

async fn ask(client: &Client, subject: &str, name: &str) -> Result<JobReply, String> {
    let body = protocol::encode(&JobRequest { v: VERSION, mapper: name.to_string() });
    let request = async_nats::Request::new().payload(body).timeout(Some(Duration::from_secs(5)));
    let message = client
        .send_request(subject.to_string(), request)
        .await
        .map_err(|e| format!("asking the fetcher for the job failed: {e}"))?;
    protocol::decode(&message.payload).map_err(|e| format!("the fetcher's job reply is unreadable: {e}"))
}
