//! Test support (feature `testing`): a real Mosquitto broker with the dynamic-security plugin on a free
//! loopback port, and a device-side MQTT client to connect to it as a provisioned device would.
//!
//! The broker comes from the Debian packages `mosquitto` and `mosquitto-clients` (`scripts/mosquitto.sh`
//! installs them); [`Broker::start`] fails with a message saying so when they are missing.

use crate::mosquitto::{MosquittoConfig, DEFAULT_TIMEOUT};
use crate::Secret;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The admin account of a test broker.
pub const ADMIN_USER: &str = "dps-admin";

/// A running Mosquitto, killed when dropped.
#[derive(Debug)]
pub struct Broker {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    /// The admin password.
    pub admin_password: String,
    dir: PathBuf,
}

fn find(names: &[&str]) -> Option<PathBuf> {
    names.iter().map(PathBuf::from).find(|p| p.exists())
}

/// The dynamic-security plugin's shared object, where Debian installs it.
pub fn plugin_path() -> Option<PathBuf> {
    find(&[
        "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/mosquitto_dynamic_security.so",
        "/usr/local/lib/mosquitto_dynamic_security.so",
    ])
}

/// A free loopback port (bound and released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Broker {
    /// Starts a broker in `dir` (its config, the dynamic-security JSON and its log live there) with an
    /// admin account made by `mosquitto_ctrl dynsec init`.
    pub fn start(dir: &Path) -> Result<Broker, String> {
        let missing = "Mosquitto is not installed: run scripts/mosquitto.sh (apt-get install mosquitto \
                       mosquitto-clients)";
        let mosquitto = find(&["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto"])
            .ok_or(missing)?;
        let ctrl = find(&["/usr/bin/mosquitto_ctrl", "/usr/local/bin/mosquitto_ctrl"]).ok_or(missing)?;
        let plugin = plugin_path().ok_or(missing)?;
        let admin_password = format!("admin-{}-{}", std::process::id(), free_port().map_err(|e| e.to_string())?);
        let dynsec = dir.join("dynsec.json");
        let status = Command::new(ctrl)
            .arg("dynsec")
            .arg("init")
            .arg(&dynsec)
            .arg(ADMIN_USER)
            .arg(&admin_password)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("mosquitto_ctrl: {e}"))?;
        if !status.success() {
            return Err(format!("mosquitto_ctrl dynsec init failed: {status}"));
        }
        let port = free_port().map_err(|e| e.to_string())?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nuser root\nallow_anonymous false\npersistence false\n\
                 listener {port} 127.0.0.1\nplugin {}\nplugin_opt_config_file {}\n\
                 log_dest file {}\nlog_type all\n",
                plugin.display(),
                dynsec.display(),
                dir.join("mosquitto.log").display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = Command::new(mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting mosquitto: {e}"))?;
        let mut broker = Broker { child, port, admin_password, dir: dir.to_owned() };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(broker);
            }
            if let Ok(Some(status)) = broker.child.try_wait() {
                return Err(format!("mosquitto exited: {status}; log: {}", broker.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("mosquitto did not listen on {port}; log: {}", broker.log()))
    }

    /// The adapter configuration for this broker's admin account.
    pub fn admin_config(&self) -> MosquittoConfig {
        MosquittoConfig {
            host: "127.0.0.1".into(),
            port: self.port,
            admin_username: ADMIN_USER.into(),
            admin_password: Secret::new(self.admin_password.clone()),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device (or watcher) connected to a broker.
pub struct Device {
    /// The client.
    pub client: AsyncClient,
    events: EventLoop,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").finish_non_exhaustive()
    }
}

/// How a connection ended before it was usable.
pub type Refusal = ConnectionError;

impl Device {
    /// Connects with `username` / `password`; the broker's refusal is the error.
    pub async fn connect(port: u16, client_id: &str, username: &str, password: &str) -> Result<Device, Refusal> {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_credentials(username, password).set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(options, 16);
        loop {
            match events.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => return Ok(Device { client, events }),
                _ => continue,
            }
        }
    }

    /// Subscribes and returns whether the broker granted it.
    pub async fn subscribe(&mut self, filter: &str) -> Result<bool, ConnectionError> {
        let _ = self.client.subscribe(filter, QoS::AtLeastOnce).await;
        loop {
            if let Event::Incoming(Packet::SubAck(ack)) = self.events.poll().await? {
                return Ok(!ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)));
            }
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK (the broker acknowledges a publish it drops by ACL too).
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), ConnectionError> {
        let _ = self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_vec()).await;
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = self.events.poll().await? {
                return Ok(());
            }
        }
    }

    /// The next message received within `wait` (None: nothing came).
    pub async fn next_message(&mut self, wait: Duration) -> Result<Option<(String, Vec<u8>)>, ConnectionError> {
        let next = async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = self.events.poll().await? {
                    return Ok::<_, ConnectionError>((p.topic, p.payload.to_vec()));
                }
            }
        };
        match tokio::time::timeout(wait, next).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Polls until the broker closes the connection (or `wait` passes): whether it closed.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let closed = async {
            loop {
                if self.events.poll().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(wait, closed).await.is_ok()
    }
}
