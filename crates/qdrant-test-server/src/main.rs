//! `qdrant-test-server`: a Qdrant-protocol (gRPC) server backed by qdrant-edge, so the
//! test suite can drive the real Qdrant client over real gRPC where no Qdrant server can be
//! installed. A test aid, built in the workspace and never shipped in the worker's binary.

mod server;

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "qdrant-test-server",
    about = "Qdrant-protocol test server (tests only)"
)]
struct Cli {
    /// Where to listen; no default port, so it never takes Qdrant's own by accident.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Folder for the collections.
    #[arg(long)]
    path: PathBuf,
    /// Largest request accepted, as tonic's (and most gRPC proxies') 4 MiB default.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_request_bytes: usize,
    /// When set, every call must carry it (`api-key` header, or `authorization: Bearer`).
    #[arg(long, env = "QDRANT_TEST_SERVER_API_KEY")]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, path = %cli.path.display(),
        max_request_bytes = cli.max_request_bytes, api_key = cli.api_key.is_some(),
        "qdrant test server listening");
    server::TestServer::new(cli.path)
        .serve(listener, cli.max_request_bytes, cli.api_key, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
