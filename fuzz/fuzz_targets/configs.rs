//! Configuration text on arbitrary bytes: the agent's TOML file (with its
//! `[jail]` table), `tern up`'s (`tern_config::Config`: store, fleet,
//! quotas, images) and the `[http]` table both daemons share. Refusing is
//! fine; panicking, or accepting what validation should refuse, is not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = tern_agent::AgentConfig::parse(Path::new("fuzz.toml"), text) {
        assert!(cfg.http.max_connections >= 1);
        assert!(cfg.http.validate().is_ok());
        if let Some(j) = &cfg.jail {
            assert!(j.uid != 0 && j.gid != 0, "a jail that runs as root");
        }
    }
    if let Ok(cfg) = tern_config::Config::parse(Path::new("tern.toml"), text) {
        assert!(cfg.listen.parse::<std::net::SocketAddr>().is_ok());
        let t = cfg.fleet.rebalance_threshold;
        assert!(t > 0.0 && t <= 1.0);
    }
    if let Ok(l) = toml::from_str::<tern_httpd::Limits>(text) {
        if l.validate().is_ok() {
            assert!(l.effective_connections() >= 1);
        }
    }
    let _ = toml::from_str::<tern_drivers::images::ImageDef>(text);
});
