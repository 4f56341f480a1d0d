//! `agentd`: Grove's node agent. See `agentd --help` and docs/agentd.md.

use std::process::ExitCode;

use clap::Parser;
use grove_agentd::config::{Config, Flags, LogFormat};
use grove_agentd::{node::Node, server};

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().with_current_span(true).with_span_list(false).init(),
        LogFormat::Text => b.with_ansi(false).init(),
    }
}

async fn run(cfg: Config) -> Result<(), String> {
    let node = Node::start(cfg.clone()).await.map_err(|e| e.one_line())?;
    if let Some(addr) = &cfg.metrics_listen {
        server::serve_metrics(node.clone(), addr)
            .await
            .map_err(|e| grove_agentd::error::one_line(&e))?;
    }
    let n = node.clone();
    let shutdown = async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down; sandboxes keep running and are adopted at the next start");
        n.shut_down();
    };
    server::serve(node, &cfg, shutdown).await.map_err(|e| grove_agentd::error::one_line(&e))
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let cfg = match Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentd: error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logs(cfg.log_format);
    #[cfg(feature = "failpoints")]
    let _scenario = fail::FailScenario::setup();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentd: error: tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("agentd: error: {e}");
            ExitCode::from(1)
        }
    }
}
