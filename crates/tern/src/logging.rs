//! The daemons' log: on stderr, filtered by `TERN_LOG` (default `info`),
//! as text or, with `TERN_LOG_FORMAT=json`, one JSON object per line for a
//! log collector. Refused logins, refused peers and checkpoints and every
//! migration decision are logged at `warn` or `info`; no secret is.

use tracing_subscriber::EnvFilter;

/// Installs the log (once; later calls do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_env("TERN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("TERN_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
