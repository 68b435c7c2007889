//! Spawning the reference server `dps-server run --config FILE` on a data directory, waiting until it is
//! ready (`ready.json`), and stopping it by its process ID with a signal.

use crate::Error;
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How the server is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StopSignal {
    /// SIGTERM: a graceful stop.
    #[default]
    Term,
    /// SIGINT (Ctrl-C): a graceful stop.
    Int,
    /// SIGKILL: a crash. Everything acknowledged must still be there after the restart.
    Kill,
}

impl StopSignal {
    /// The `kill` option naming the signal.
    fn option(self) -> &'static str {
        match self {
            StopSignal::Term => "-TERM",
            StopSignal::Int => "-INT",
            StopSignal::Kill => "-KILL",
        }
    }

    /// The signal's name.
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
            StopSignal::Kill => "SIGKILL",
        }
    }
}

/// What the spawned server is configured with.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// The `dps-server` executable.
    pub bin: PathBuf,
    /// Address both listeners bind.
    pub host: IpAddr,
    /// HTTPS port.
    pub https_port: u16,
    /// MQTT-over-TLS port.
    pub mqtt_port: u16,
    /// AMQP-over-TLS port.
    pub amqp_port: u16,
    /// The ID scope.
    pub id_scope: String,
    /// Service host name (the audience of service SAS tokens).
    pub service_host_name: String,
    /// Linked IoT hub host names.
    pub hubs: Vec<String>,
    /// Retry-After sent with 202 answers.
    pub retry_after_secs: u32,
    /// Answer registers 202 before the hub work (`respond_early`).
    pub respond_early: bool,
    /// The data directory (store, `tls/ca.pem`, `connection-string.txt`, `ready.json`).
    pub data_dir: PathBuf,
    /// Where the configuration file and the server logs go.
    pub work_dir: PathBuf,
}

#[derive(Serialize)]
struct ConfigFile<'a> {
    id_scope: &'a str,
    service_host_name: &'a str,
    data_dir: &'a Path,
    retry_after_secs: u32,
    respond_early: bool,
    listen: Listen,
    tls: Tls,
    linked_hubs: Vec<Hub<'a>>,
    custom_allocation: CustomAllocation,
}

#[derive(Serialize)]
struct CustomAllocation {
    /// The `custom` mode's webhook is plain HTTP on loopback.
    allow_http: bool,
}

#[derive(Serialize)]
struct Listen {
    https: String,
    mqtt: String,
    amqp: String,
}

#[derive(Serialize)]
struct Tls {
    subject_alt_names: Vec<String>,
}

#[derive(Serialize)]
struct Hub<'a> {
    host_name: &'a str,
}

impl ServerSettings {
    /// The HTTPS listener's address.
    pub fn https_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.https_port)
    }

    /// The MQTT listener's address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.mqtt_port)
    }

    /// The AMQP listener's address.
    pub fn amqp_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.amqp_port)
    }

    /// The configuration file's text (TOML).
    pub fn config_toml(&self) -> Result<String, Error> {
        let file = ConfigFile {
            id_scope: &self.id_scope,
            service_host_name: &self.service_host_name,
            data_dir: &self.data_dir,
            retry_after_secs: self.retry_after_secs,
            respond_early: self.respond_early,
            listen: Listen {
                https: self.https_addr().to_string(),
                mqtt: self.mqtt_addr().to_string(),
                amqp: self.amqp_addr().to_string(),
            },
            tls: Tls { subject_alt_names: vec![self.host.to_string(), "localhost".to_owned()] },
            linked_hubs: self.hubs.iter().map(|h| Hub { host_name: h }).collect(),
            custom_allocation: CustomAllocation { allow_http: true },
        };
        toml::to_string(&file).map_err(|e| Error::Config(format!("writing the server configuration: {e}")))
    }

    /// Writes the configuration file into the work directory; returns its path.
    pub fn write_config(&self) -> Result<PathBuf, Error> {
        std::fs::create_dir_all(&self.data_dir)
            .map_err(|e| Error::io(format!("creating {}", self.data_dir.display()), e))?;
        let path = self.work_dir.join("dps-server.toml");
        std::fs::write(&path, self.config_toml()?)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(path)
    }
}

/// A running `dps-server` child process. It is killed if dropped while still running.
#[derive(Debug)]
pub struct SpawnedServer {
    child: Child,
    pid: u32,
    log: PathBuf,
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl SpawnedServer {
    /// Starts the server (removing a stale `ready.json` first) and waits up to `timeout` for `ready.json`
    /// and an accepting HTTPS listener. Its output goes to `{work_dir}/{log_name}`.
    pub async fn start(
        settings: &ServerSettings,
        log_name: &str,
        timeout: Duration,
    ) -> Result<SpawnedServer, Error> {
        let config = settings.write_config()?;
        let ready = settings.data_dir.join("ready.json");
        match std::fs::remove_file(&ready) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", ready.display()), e)),
        }
        let log = settings.work_dir.join(log_name);
        let out =
            std::fs::File::create(&log).map_err(|e| Error::io(format!("creating {}", log.display()), e))?;
        let err = out.try_clone().map_err(|e| Error::io("duplicating the log file", e))?;
        let mut command = Command::new(&settings.bin);
        // Only the configuration file configures it: no DPS_* overrides inherited from this environment.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("DPS_") {
                command.env_remove(&name);
            }
        }
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io(format!("starting {}", settings.bin.display()), e))?;
        let pid = child.id().ok_or_else(|| Error::Server("the server exited at once".to_owned()))?;
        let mut server = SpawnedServer { child, pid, log };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(Error::Server(format!(
                    "{} exited during startup with {status}; its log ({}):\n{}",
                    settings.bin.display(),
                    server.log.display(),
                    tail(&server.log)
                )));
            }
            if ready.exists() && tokio::net::TcpStream::connect(settings.https_addr()).await.is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(Error::Server(format!(
                    "not ready after {} s (no {} or no listener on {}); its log ({}):\n{}",
                    timeout.as_secs(),
                    ready.display(),
                    settings.https_addr(),
                    server.log.display(),
                    tail(&server.log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Sends `signal` to this process (by its ID) and waits up to `timeout` for it to exit. A graceful stop
    /// that does not end in time, or ends unsuccessfully, is an error (the process is then killed).
    pub async fn stop(mut self, signal: StopSignal, timeout: Duration) -> Result<ExitStatus, Error> {
        let sent = Command::new("kill")
            .arg(signal.option())
            .arg(self.pid.to_string())
            .status()
            .await
            .map_err(|e| Error::io("running kill", e))?;
        if !sent.success() {
            return Err(Error::Server(format!("could not send {} to process {}", signal.name(), self.pid)));
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                if signal != StopSignal::Kill && !status.success() {
                    return Err(Error::Server(format!(
                        "after {} the server exited with {status}; its log ({}):\n{}",
                        signal.name(),
                        self.log.display(),
                        tail(&self.log)
                    )));
                }
                Ok(status)
            }
            Ok(Err(e)) => Err(Error::io("waiting for the server to exit", e)),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                Err(Error::Server(format!(
                    "still running {} s after {}; killed. Its log ({}):\n{}",
                    timeout.as_secs(),
                    signal.name(),
                    self.log.display(),
                    tail(&self.log)
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_the_documented_shape() {
        let s = ServerSettings {
            bin: "dps-server".into(),
            host: "127.0.0.30".parse().unwrap(),
            https_port: 443,
            mqtt_port: 8883,
            amqp_port: 5671,
            id_scope: "0ne00000A11".into(),
            service_host_name: "loadgen.localhost".into(),
            hubs: vec!["hub-1.localhost".into(), "hub-2.localhost".into()],
            retry_after_secs: 1,
            respond_early: true,
            data_dir: "/tmp/x/data".into(),
            work_dir: "/tmp/x".into(),
        };
        let text = s.config_toml().unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["id_scope"].as_str(), Some("0ne00000A11"));
        assert_eq!(v["data_dir"].as_str(), Some("/tmp/x/data"));
        assert_eq!(v["listen"]["https"].as_str(), Some("127.0.0.30:443"));
        assert_eq!(v["listen"]["mqtt"].as_str(), Some("127.0.0.30:8883"));
        assert_eq!(v["listen"]["amqp"].as_str(), Some("127.0.0.30:5671"));
        assert_eq!(v["tls"]["subject_alt_names"][0].as_str(), Some("127.0.0.30"));
        assert_eq!(v["linked_hubs"][1]["host_name"].as_str(), Some("hub-2.localhost"));
        assert_eq!(v["retry_after_secs"].as_integer(), Some(1));
    }
}
