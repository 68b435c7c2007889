//! `dps-server`: runs the reference DPS server (default), or an admin / device command. See
//! `dps-server --help` and the README's "Reference server" section.
#![forbid(unsafe_code)]
// A program: it reads the environment, installs signal handlers and prints.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use clap::Parser;
use dps_server::cli::{run_admin, Cli, Command, LogFormat, RunArgs};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc malloc: the server allocates per request on many threads, and glibc's
/// arena locking and consolidation showed up as ~10% of server CPU in the load generator's profiles.
/// The load generator's in-process baseline server uses the same allocator, so ratios stay fair.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn run_server(args: RunArgs) -> ExitCode {
    init_logging(args.log_format);
    let show_secrets = args.show_secrets;
    let config = match args.resolve(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dps-server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dps-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let server = match dps_server::server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("dps-server: {e}");
                return ExitCode::FAILURE;
            }
        };
        print!("{}", server.summary(show_secrets));
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        shutdown_signal().await;
        eprintln!("dps-server: stopping (press Ctrl-C again to exit at once)");
        tokio::spawn(async {
            shutdown_signal().await;
            eprintln!("dps-server: exiting at once");
            std::process::exit(130);
        });
        match server.shutdown().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dps-server: shutdown: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => run_server(cli.run),
        Some(Command::Run(args)) => run_server(args),
        Some(command) => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(run_admin(command)),
            Err(e) => {
                eprintln!("dps-server: cannot start the async runtime: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
