//! `tern actor`: deploy, message, move and inspect WebAssembly actors
//! through an executor's API (`tern executor`). Where an actor runs on
//! another executor, the one asked says which (gossip tells it), and the
//! command follows there once.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How to reach an executor.
#[derive(clap::Args, Clone)]
pub struct ExecConn {
    /// The executor's API URL.
    #[arg(
        long = "api",
        env = "TERN_EXECUTOR_API",
        default_value = "http://127.0.0.1:7402"
    )]
    pub url: String,
    /// An API token (`tern token`).
    #[arg(long = "api-token", env = "TERN_TOKEN", hide_env_values = true)]
    pub token: String,
}

/// `tern actor`.
#[derive(clap::Subcommand)]
pub enum ActorCmd {
    /// Start an actor from a module (.wat text or .wasm binary).
    Deploy {
        /// The module.
        module: PathBuf,
        /// No state kept: no checkpoints, no moves.
        #[arg(long)]
        ephemeral: bool,
        /// How often its state is checkpointed (and replicated), ms.
        #[arg(long, default_value_t = 1000)]
        checkpoint_interval_ms: u64,
        /// The most linear memory it may have.
        #[arg(long)]
        max_state_size_bytes: Option<u64>,
        #[command(flatten)]
        api: ExecConn,
    },
    /// Send a message and print the reply (hex).
    Send {
        /// The actor.
        id: String,
        /// Who sends (each sender's messages are handled once, in order).
        #[arg(long, default_value = "cli")]
        sender: String,
        /// The message's number in the sender's order (from 1).
        #[arg(long)]
        seq: u64,
        /// The payload, hex.
        #[arg(long)]
        payload_hex: String,
        #[command(flatten)]
        api: ExecConn,
    },
    /// Move an actor to another executor, following it to the end.
    Migrate {
        /// The actor.
        id: String,
        /// The executor to move it to.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        api: ExecConn,
    },
    /// Stop an actor (its checkpoints stay on the executor).
    Stop {
        /// The actor.
        id: String,
        #[command(flatten)]
        api: ExecConn,
    },
    /// Your actors on an executor.
    List {
        #[command(flatten)]
        api: ExecConn,
    },
    /// One actor.
    Show {
        /// The actor.
        id: String,
        #[command(flatten)]
        api: ExecConn,
    },
}

struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    fn new(c: &ExecConn) -> Self {
        Self {
            base: c.url.trim_end_matches('/').into(),
            token: c.token.clone(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client builds"),
        }
    }

    /// One request; a 409 that names another executor's API is followed once.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (status, v) = self
            .raw(&self.base, method.clone(), path, body.clone())
            .await?;
        if status == reqwest::StatusCode::CONFLICT {
            if let Some(api) = v["api"].as_str() {
                let (status, v) = self.raw(api, method, path, body).await?;
                return check(status, v, api);
            }
        }
        check(status, v, &self.base)
    }

    async fn raw(
        &self,
        base: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let mut req = self
            .http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the executor at {base}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }
}

fn check(status: reqwest::StatusCode, v: Value, base: &str) -> anyhow::Result<Value> {
    if !status.is_success() {
        let msg = v["error"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| v.to_string());
        bail!("the executor at {base} answered {status}: {msg}");
    }
    Ok(v)
}

/// Runs `tern actor ...`.
pub fn run(cmd: ActorCmd) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(cmd))
}

async fn run_async(cmd: ActorCmd) -> anyhow::Result<()> {
    match cmd {
        ActorCmd::Deploy {
            module,
            ephemeral,
            checkpoint_interval_ms,
            max_state_size_bytes,
            api,
        } => {
            let bytes =
                std::fs::read(&module).with_context(|| format!("reading {}", module.display()))?;
            let mut body = json!({
                "stateful": !ephemeral,
                "checkpoint_interval_ms": checkpoint_interval_ms,
                "max_state_size_bytes": max_state_size_bytes,
            });
            if bytes.starts_with(b"\0asm") {
                body["module_hex"] = json!(hex::encode(&bytes));
            } else {
                body["wat"] = json!(String::from_utf8(bytes).context("a .wat module is text")?);
            }
            let v = Client::new(&api)
                .call(reqwest::Method::POST, "/api/v1/actors", Some(body))
                .await?;
            println!(
                "{} on {}",
                v["id"].as_str().unwrap_or("?"),
                v["executor"].as_str().unwrap_or("?")
            );
        }
        ActorCmd::Send {
            id,
            sender,
            seq,
            payload_hex,
            api,
        } => {
            let body = json!({"sender": sender, "seq": seq, "payload_hex": payload_hex});
            let v = Client::new(&api)
                .call(
                    reqwest::Method::POST,
                    &format!("/api/v1/actors/{id}/messages"),
                    Some(body),
                )
                .await?;
            match (v["reply_hex"].as_str(), v["duplicate"].as_bool()) {
                (Some(r), _) => println!("{r}"),
                (None, Some(true)) => println!("already handled (a duplicate): not run again"),
                _ => println!("queued"),
            }
        }
        ActorCmd::Migrate { id, to, api } => migrate(&Client::new(&api), &id, &to).await?,
        ActorCmd::Stop { id, api } => {
            Client::new(&api)
                .call(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/actors/{id}"),
                    None,
                )
                .await?;
            println!("{id} stopped");
        }
        ActorCmd::List { api } => {
            let v = Client::new(&api)
                .call(reqwest::Method::GET, "/api/v1/actors", None)
                .await?;
            println!(
                "{:<34} {:<12} {:>6} {:>9} {:>7}  STATE",
                "ID", "EXECUTOR", "EPOCH", "CHECKPT", "QUEUED"
            );
            for a in v["actors"].as_array().into_iter().flatten() {
                let state = if a["migrating"].as_bool() == Some(true) {
                    "migrating"
                } else if a["paused"].as_bool() == Some(true) {
                    "paused"
                } else {
                    "running"
                };
                println!(
                    "{:<34} {:<12} {:>6} {:>9} {:>7}  {state}",
                    a["id"].as_str().unwrap_or("?"),
                    a["executor"].as_str().unwrap_or("?"),
                    a["epoch"],
                    a["checkpoint_sequence"],
                    a["queued"],
                );
            }
        }
        ActorCmd::Show { id, api } => {
            let v = Client::new(&api)
                .call(reqwest::Method::GET, &format!("/api/v1/actors/{id}"), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}

/// Starts a move and follows it until it ends.
async fn migrate(c: &Client, id: &str, to: &str) -> anyhow::Result<()> {
    let v = c
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/actors/{id}/migrate"),
            Some(json!({"to": to})),
        )
        .await?;
    let m = v["migration"]
        .as_str()
        .context("no migration in the answer")?
        .to_string();
    let start = Instant::now();
    loop {
        let s = c
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/actor-migrations/{m}"),
                None,
            )
            .await?;
        if s["done"].as_bool() == Some(true) {
            let state = s["state"].as_str().unwrap_or("?");
            println!(
                "{m}: {state} after {:.1} ms (paused {:.2} ms, {} rounds, {} checkpoint bytes)",
                s["total_ms"].as_f64().unwrap_or(f64::NAN),
                s["pause_ms"].as_f64().unwrap_or(f64::NAN),
                s["rounds"],
                s["checkpoint_bytes"],
            );
            if state != "Complete" {
                bail!("the migration did not complete: {state}");
            }
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("{m} has not ended after 120 s: {}", s["state"]);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
