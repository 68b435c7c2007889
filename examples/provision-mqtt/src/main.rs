//! Provisions one symmetric-key device over MQTT 3.1.1 (TLS) against a running `dps-server` with the
//! `dps-client` crate, and prints the assignment.
//!
//! ```text
//! provision-mqtt --id-scope SCOPE --registration-id ID (--group-key KEY | --device-key KEY)
//!                [--data-dir ./dps-data] [--endpoint HOST:PORT] [--server-name localhost]
//! ```
//!
//! The trust root is the server's `DATA_DIR/tls/ca.pem`; the endpoint defaults to the `mqtt` address of
//! `DATA_DIR/ready.json` (written by the server once it accepts connections).
// Examples are programs: they read their arguments and files.
#![allow(clippy::disallowed_methods)]

use dps_client::proto::sas::SymmetricKey;
use dps_client::{provision, Auth, ProvisionError, ProvisionOptions, Transport};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Default)]
struct Args {
    data_dir: Option<PathBuf>,
    id_scope: Option<String>,
    registration_id: Option<String>,
    group_key: Option<String>,
    device_key: Option<String>,
    endpoint: Option<String>,
    server_name: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--data-dir" => args.data_dir = Some(PathBuf::from(value()?)),
            "--id-scope" => args.id_scope = Some(value()?),
            "--registration-id" => args.registration_id = Some(value()?),
            "--group-key" => args.group_key = Some(value()?),
            "--device-key" => args.device_key = Some(value()?),
            "--endpoint" => args.endpoint = Some(value()?),
            "--server-name" => args.server_name = Some(value()?),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(args)
}

async fn run(args: Args) -> Result<serde_json::Value, String> {
    let data_dir = args.data_dir.unwrap_or_else(|| PathBuf::from("./dps-data"));
    let ca = std::fs::read(data_dir.join("tls/ca.pem"))
        .map_err(|e| format!("cannot read {}: {e}", data_dir.join("tls/ca.pem").display()))?;
    let endpoint = match args.endpoint {
        Some(e) => e,
        None => {
            let path = data_dir.join("ready.json");
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {} (is the server running?): {e}", path.display()))?;
            let ready: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            ready["mqtt"].as_str().ok_or("the server has no MQTT listener")?.to_owned()
        }
    };
    let key = |k: &str| SymmetricKey::parse(k.trim()).map_err(|e| format!("bad key: {}", e.message));
    let auth = match (&args.group_key, &args.device_key) {
        (Some(g), _) => Auth::GroupKey(key(g)?),
        (None, Some(d)) => Auth::SymmetricKey(key(d)?),
        (None, None) => return Err("give --group-key or --device-key".into()),
    };
    let result = provision(ProvisionOptions {
        endpoint,
        server_name: Some(args.server_name.unwrap_or_else(|| "localhost".into())),
        id_scope: args.id_scope.ok_or("--id-scope is required")?,
        registration_id: args.registration_id.ok_or("--registration-id is required")?,
        auth,
        transport: Transport::Mqtt,
        roots: dps_client::tls::certificates(&ca).map_err(|e| e.to_string())?,
        ..ProvisionOptions::default()
    })
    .await
    .map_err(|e| match &e {
        ProvisionError::Registration(r) => format!("{e} (errorCode {})", r.code),
        _ => e.to_string(),
    })?;
    eprintln!("assigned to {} as {} ({:?})", result.assigned_hub, result.device_id, result.substatus);
    serde_json::to_value(&result.registration).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let outcome = match parse_args() {
        Ok(args) => run(args).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(json) => {
            println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("provision-mqtt: {e}");
            ExitCode::FAILURE
        }
    }
}
