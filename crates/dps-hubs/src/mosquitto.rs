//! A Mosquitto broker as an IoT hub: the devices' hub identities are accounts of Mosquitto's
//! dynamic-security plugin, managed through its control topic `$CONTROL/dynamic-security/v1` by an admin
//! account.
//!
//! What provisioning a device does on the broker (`UpsertDevice`):
//!
//! 1. the device's twin is published **retained** (QoS 1) on [`twin_topic`] `devices/{deviceId}/twin` as
//!    `{"tags":…,"properties":{"desired":…},"capabilities":{"iotEdge":…}}` (for a new device, or when the
//!    reprovision policy resets it; an existing device keeps its twin otherwise);
//! 2. the role `dps-device:{deviceId}` is created, allowing the device to publish on
//!    `devices/{deviceId}/messages/events/#` and `devices/{deviceId}/twin/reported`, and to subscribe to
//!    `devices/{deviceId}/messages/devicebound/#` and `devices/{deviceId}/twin` (no other device can read
//!    that twin: subscriptions are denied by default);
//! 3. last, the client `username = deviceId` is created (or modified) with that role and, for a
//!    symmetric-key device, the password = its **primary key as provisioned (base64 text)**. The broker
//!    stores only a salted hash of it.
//!
//! The client comes last, so a device can log in only once its role and twin exist: a broker failing half
//! way leaves no identity a device could use (a retained twin without a client is unreadable). A device that
//! moves away (`DeleteDevice`) loses its client (the plugin disconnects it at once), its role and its
//! retained twin. `ReadTwin` reads the retained twin back for migration (no client: no device).
//!
//! X.509 devices get a client without a password: on a TLS listener with `require_certificate true` and
//! `use_identity_as_username true` the broker takes the certificate's subject CN (= the device ID of an
//! X.509 registration) as the username. The broker then checks the certificate against its own `cafile`,
//! not the thumbprint DPS verified, and it authenticates any certificate it trusts whether or not a client
//! exists; a device without a client only has the broker's default access (with the plugin's defaults,
//! nothing it could publish or subscribe to).
//!
//! The admin account needs the plugin's admin rights (`mosquitto_ctrl dynsec init` creates one); on first
//! use the adapter adds to it the role `dps-provisioner`, which allows publishing and reading the twin
//! topics. Each operation opens its own MQTT connection (plain TCP: put the admin listener on loopback or a
//! private network), bounded by [`MosquittoConfig::timeout`].

use crate::{hub_error, Secret};
use dps_core::hub::{
    AsyncHubDirectory, DeviceIdentity, DeviceTwin, HubAuthentication, HubError, HubOp, HubResult,
};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{json, Value};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The plugin's control topic.
pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
/// Where the plugin answers.
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// The role the adapter gives its admin account (publish and read the twin topics).
pub const PROVISIONER_ROLE: &str = "dps-provisioner";
/// The default bound on one operation (connect included).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The retained twin of a device: `devices/{deviceId}/twin`.
pub fn twin_topic(device_id: &str) -> String {
    format!("devices/{device_id}/twin")
}

/// The device-to-cloud topic filter of a device: `devices/{deviceId}/messages/events/#`.
pub fn events_topic(device_id: &str) -> String {
    format!("devices/{device_id}/messages/events/#")
}

/// The role of a device: `dps-device:{deviceId}`.
pub fn role_name(device_id: &str) -> String {
    format!("dps-device:{device_id}")
}

/// How to reach a broker's admin account.
#[derive(Debug, Clone, PartialEq)]
pub struct MosquittoConfig {
    /// Broker host (name or IP address).
    pub host: String,
    /// Broker port (a plain MQTT listener).
    pub port: u16,
    /// The dynamic-security admin username.
    pub admin_username: String,
    /// Its password.
    pub admin_password: Secret,
    /// Bound on one operation, connection included.
    pub timeout: Duration,
}

/// A Mosquitto broker (dynamic-security plugin) serving as the hub `hub`.
pub struct MosquittoDirectory {
    hub: String,
    config: MosquittoConfig,
    next_session: AtomicU64,
    prepared: AtomicBool,
}

impl std::fmt::Debug for MosquittoDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MosquittoDirectory").field("hub", &self.hub).field("config", &self.config).finish()
    }
}

impl MosquittoDirectory {
    /// An adapter for the hub named `hub`, on the broker of `config`.
    pub fn new(hub: impl Into<String>, config: MosquittoConfig) -> MosquittoDirectory {
        MosquittoDirectory {
            hub: hub.into().to_ascii_lowercase(),
            config,
            next_session: AtomicU64::new(0),
            prepared: AtomicBool::new(false),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MosquittoConfig {
        &self.config
    }

    fn err(&self, message: impl Into<String>) -> HubError {
        hub_error(&self.hub, message)
    }

    async fn bounded<T>(
        &self,
        what: &str,
        work: impl Future<Output = Result<T, HubError>>,
    ) -> Result<T, HubError> {
        match tokio::time::timeout(self.config.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(self.err(format!(
                "the broker at {}:{} did not complete {what} within {} ms",
                self.config.host,
                self.config.port,
                self.config.timeout.as_millis()
            ))),
        }
    }

    async fn connect(&self) -> Result<Session, HubError> {
        if !self.prepared.load(Ordering::Acquire) {
            // Adding a role to a client makes the plugin disconnect it: prepare on a connection of its own.
            let mut first = self.open().await?;
            if self.prepare(&mut first).await? {
                first.close().await;
            }
            let mut session = self.open().await?;
            if !session.admin_has_provisioner_role(&self.config.admin_username).await? {
                return Err(self.err(format!(
                    "the admin account '{}' could not be given the role '{PROVISIONER_ROLE}'",
                    self.config.admin_username
                )));
            }
            self.prepared.store(true, Ordering::Release);
            return Ok(session);
        }
        self.open().await
    }

    async fn open(&self) -> Result<Session, HubError> {
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        let mut options = MqttOptions::new(
            format!("dps-rs-{}-{n}", std::process::id()),
            &self.config.host,
            self.config.port,
        );
        options
            .set_credentials(&self.config.admin_username, self.config.admin_password.expose())
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, events) = AsyncClient::new(options, 16);
        let mut session = Session { client, events, hub: self.hub.clone(), correlation: 0 };
        loop {
            match session.events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err(self.err(format!(
                        "the broker refused the admin credential of '{}' ({code:?})",
                        self.config.admin_username
                    )))
                }
                Err(e) => {
                    return Err(self.err(format!(
                        "cannot reach the broker at {}:{}: {e}",
                        self.config.host, self.config.port
                    )))
                }
            }
        }
        session.subscribe(RESPONSE_TOPIC).await?;
        Ok(session)
    }

    /// Creates the role `dps-provisioner` (publish and read the twin topics) and gives it to the admin
    /// account, once per adapter. Whether the session is still usable (giving the role disconnects it).
    async fn prepare(&self, session: &mut Session) -> Result<bool, HubError> {
        let twins = "devices/+/twin";
        let answers = session
            .commands(vec![json!({"command": "createRole", "rolename": PROVISIONER_ROLE,
            "textdescription": "dps-rs: publishes and reads device twins",
            "acls": [
                {"acltype": "publishClientSend", "topic": twins, "allow": true},
                {"acltype": "publishClientReceive", "topic": twins, "allow": true},
                {"acltype": "subscribePattern", "topic": twins, "allow": true},
            ]})])
            .await?;
        if let Some(e) = answers.first().and_then(answer_error) {
            if !e.contains("already exists") {
                return Err(self.err(format!("creating the role '{PROVISIONER_ROLE}': {e}")));
            }
        }
        if session.admin_has_provisioner_role(&self.config.admin_username).await? {
            return Ok(true);
        }
        let add = json!({"command": "addClientRole", "username": self.config.admin_username,
                         "rolename": PROVISIONER_ROLE});
        // The plugin applies it, then closes this connection: a lost connection is the expected answer.
        match session.commands(vec![add]).await {
            Ok(answers) => match answers.first().and_then(answer_error) {
                Some(e) => {
                    Err(self.err(format!("giving the admin account the role '{PROVISIONER_ROLE}': {e}")))
                }
                None => Ok(false),
            },
            Err(_) => Ok(false),
        }
    }

    async fn upsert(
        &self,
        identity: DeviceIdentity,
        twin: DeviceTwin,
        replace_twin: bool,
    ) -> Result<HubResult, HubError> {
        let id = self.checked_id(&identity.device_id)?;
        let password = match &identity.authentication {
            HubAuthentication::Sas { primary_key, .. } => Some(primary_key.clone()),
            _ => None,
        };
        let mut session = self.connect().await?;
        let exists = session.client_exists(id).await?;
        if !exists || replace_twin {
            session.publish_retained(&twin_topic(id), twin_payload(&twin)).await?;
        }
        let role = role_name(id);
        let mut client = json!({"username": id, "roles": [{"rolename": role}],
                                "textname": "dps-rs device"});
        if let Some(p) = password {
            client["password"] = Value::String(p);
        }
        let mut create = client.clone();
        create["command"] = json!(if exists { "modifyClient" } else { "createClient" });
        let answers = session.commands(vec![role_command(id), create]).await?;
        if let Some(e) = answers.first().and_then(answer_error) {
            if !e.contains("already exists") {
                return Err(self.err(format!("creating the role '{role}': {e}")));
            }
        }
        match answers.get(1).and_then(answer_error) {
            None => {}
            // Created meanwhile by another registration of the same device: update it instead.
            Some(e) if e.contains("already exists") => {
                let mut modify = client;
                modify["command"] = json!("modifyClient");
                let answers = session.commands(vec![modify]).await?;
                if let Some(e) = answers.first().and_then(answer_error) {
                    return Err(self.err(format!("updating the client '{id}': {e}")));
                }
            }
            Some(e) => return Err(self.err(format!("creating the client '{id}': {e}"))),
        }
        session.close().await;
        Ok(HubResult::Done)
    }

    async fn read_twin(&self, device_id: String) -> Result<HubResult, HubError> {
        let id = self.checked_id(&device_id)?;
        let mut session = self.connect().await?;
        let topic = twin_topic(id);
        session.subscribe(&topic).await?;
        // The retained twin is delivered right after the SUBACK, before the answer to this command.
        let (answers, retained) = session
            .commands_collecting(vec![json!({"command": "getClient", "username": id})], &topic)
            .await?;
        session.close().await;
        match answers.first().and_then(answer_error) {
            Some(e) if e.contains("not found") => return Ok(HubResult::Twin(None)),
            Some(e) => return Err(self.err(format!("reading the client '{id}': {e}"))),
            None => {}
        }
        match retained {
            Some(payload) if !payload.is_empty() => parse_twin(&payload)
                .map(|t| HubResult::Twin(Some(t)))
                .map_err(|e| self.err(format!("the retained twin on '{topic}' is not valid: {e}"))),
            _ => Ok(HubResult::Twin(Some(DeviceTwin::default()))),
        }
    }

    async fn delete(&self, device_id: String) -> Result<HubResult, HubError> {
        let id = self.checked_id(&device_id)?;
        let mut session = self.connect().await?;
        let answers = session
            .commands(vec![
                json!({"command": "deleteClient", "username": id}),
                json!({"command": "deleteRole", "rolename": role_name(id)}),
            ])
            .await?;
        for answer in &answers {
            if let Some(e) = answer_error(answer) {
                if !e.contains("not found") {
                    return Err(self.err(format!("deleting the device '{id}': {e}")));
                }
            }
        }
        session.publish_retained(&twin_topic(id), Vec::new()).await?;
        session.close().await;
        Ok(HubResult::Done)
    }

    /// A device ID usable in topics: no MQTT wildcard, no level separator.
    fn checked_id<'a>(&self, id: &'a str) -> Result<&'a str, HubError> {
        if id.is_empty() || id.contains(['+', '#', '/', '\0']) {
            return Err(self.err(format!(
                "the device ID '{id}' cannot name an MQTT account ('+', '#', '/' are not allowed)"
            )));
        }
        Ok(id)
    }
}

fn role_command(id: &str) -> Value {
    let acl = |acltype: &str, topic: String| json!({"acltype": acltype, "topic": topic, "allow": true});
    json!({"command": "createRole", "rolename": role_name(id),
    "textdescription": "dps-rs: the topics of one device",
    "acls": [
        acl("publishClientSend", events_topic(id)),
        acl("publishClientSend", format!("devices/{id}/twin/reported")),
        acl("subscribePattern", format!("devices/{id}/messages/devicebound/#")),
        acl("subscribePattern", twin_topic(id)),
        acl("publishClientReceive", format!("devices/{id}/#")),
    ]})
}

/// The `error` of one plugin answer, if it failed.
fn answer_error(answer: &Value) -> Option<&str> {
    answer.get("error").and_then(Value::as_str)
}

/// The retained twin document of a device.
pub fn twin_payload(twin: &DeviceTwin) -> Vec<u8> {
    let object = |v: &Value| if v.is_object() { v.clone() } else { json!({}) };
    let doc = json!({
        "tags": object(&twin.tags),
        "properties": {"desired": object(&twin.desired)},
        "capabilities": {"iotEdge": twin.iot_edge},
    });
    doc.to_string().into_bytes()
}

/// Parses a retained twin document.
pub fn parse_twin(payload: &[u8]) -> Result<DeviceTwin, String> {
    let doc: Value = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    if !doc.is_object() {
        return Err("not a JSON object".to_owned());
    }
    let object = |v: Option<&Value>| match v {
        Some(v) if v.is_object() => v.clone(),
        _ => json!({}),
    };
    Ok(DeviceTwin {
        tags: object(doc.get("tags")),
        desired: object(doc.pointer("/properties/desired")),
        iot_edge: doc.pointer("/capabilities/iotEdge").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// One admin connection.
struct Session {
    client: AsyncClient,
    events: EventLoop,
    hub: String,
    correlation: u64,
}

impl Session {
    fn err(&self, message: impl Into<String>) -> HubError {
        hub_error(&self.hub, message)
    }

    fn lost(&self, e: ConnectionError) -> HubError {
        self.err(format!("the broker connection failed: {e}"))
    }

    async fn subscribe(&mut self, topic: &str) -> Result<(), HubError> {
        self.client.subscribe(topic, QoS::AtLeastOnce).await.map_err(|e| self.err(e.to_string()))?;
        loop {
            match self.events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        return Err(self.err(format!("the broker refused the subscription to '{topic}'")));
                    }
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => return Err(self.lost(e)),
            }
        }
    }

    async fn publish_retained(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), HubError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .map_err(|e| self.err(e.to_string()))?;
        let mut pkid = None;
        loop {
            match self.events.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(id))) => pkid = Some(id),
                Ok(Event::Incoming(Packet::PubAck(ack))) if pkid == Some(ack.pkid) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(self.lost(e)),
            }
        }
    }

    async fn commands(&mut self, commands: Vec<Value>) -> Result<Vec<Value>, HubError> {
        Ok(self.commands_collecting(commands, "").await?.0)
    }

    /// Sends commands in one control message and waits for their answers (in order); meanwhile keeps the
    /// last message received on `collect` (when not empty).
    async fn commands_collecting(
        &mut self,
        mut commands: Vec<Value>,
        collect: &str,
    ) -> Result<(Vec<Value>, Option<bytes::Bytes>), HubError> {
        self.correlation += 1;
        let tag = format!("dps-rs-{}", self.correlation);
        for (i, c) in commands.iter_mut().enumerate() {
            c["correlationData"] = Value::String(format!("{tag}-{i}"));
        }
        let count = commands.len();
        let body = json!({ "commands": commands }).to_string();
        self.client
            .publish(CONTROL_TOPIC, QoS::AtMostOnce, false, body.into_bytes())
            .await
            .map_err(|e| self.err(e.to_string()))?;
        let mut collected = None;
        loop {
            let publish = match self.events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => p,
                Ok(_) => continue,
                Err(e) => return Err(self.lost(e)),
            };
            if !collect.is_empty() && publish.topic == collect {
                collected = Some(publish.payload);
                continue;
            }
            if publish.topic != RESPONSE_TOPIC {
                continue;
            }
            let doc: Value = serde_json::from_slice(&publish.payload)
                .map_err(|e| self.err(format!("the plugin answered something that is not JSON: {e}")))?;
            let Some(responses) = doc.get("responses").and_then(Value::as_array) else {
                return Err(self.err(format!("the plugin answered without responses: {doc}")));
            };
            let ours = |r: &&Value| {
                r.get("correlationData")
                    .and_then(Value::as_str)
                    .is_some_and(|c| c.strip_prefix(tag.as_str()).is_some_and(|rest| rest.starts_with('-')))
            };
            let mine: Vec<Value> = responses.iter().filter(ours).cloned().collect();
            if mine.is_empty() {
                continue;
            }
            if mine.len() != count {
                return Err(self.err(format!("the plugin answered {} of {count} commands", mine.len())));
            }
            return Ok((mine, collected));
        }
    }

    async fn admin_has_provisioner_role(&mut self, admin: &str) -> Result<bool, HubError> {
        let answers = self.commands(vec![json!({"command": "getClient", "username": admin})]).await?;
        if let Some(e) = answers.first().and_then(answer_error) {
            return Err(self.err(format!("reading the admin account '{admin}': {e}")));
        }
        let roles = answers.first().and_then(|a| a.pointer("/data/client/roles")).and_then(Value::as_array);
        Ok(roles.is_some_and(|roles| {
            roles.iter().any(|r| r.get("rolename").and_then(Value::as_str) == Some(PROVISIONER_ROLE))
        }))
    }

    async fn client_exists(&mut self, id: &str) -> Result<bool, HubError> {
        let answers = self.commands(vec![json!({"command": "getClient", "username": id})]).await?;
        match answers.first().and_then(answer_error) {
            None => Ok(true),
            Some(e) if e.contains("not found") => Ok(false),
            Some(e) => Err(self.err(format!("reading the client '{id}': {e}"))),
        }
    }

    /// Sends DISCONNECT and lets the event loop flush it (bounded).
    async fn close(mut self) {
        if self.client.try_disconnect().is_ok() {
            let flush = async {
                loop {
                    match self.events.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(500), flush).await;
        }
    }
}

impl AsyncHubDirectory for MosquittoDirectory {
    async fn execute(&self, op: HubOp) -> Result<HubResult, HubError> {
        match op {
            HubOp::UpsertDevice { identity, twin, replace_twin, .. } => {
                self.bounded("the device's registration", self.upsert(identity, twin, replace_twin)).await
            }
            HubOp::ReadTwin { device_id, .. } => {
                self.bounded("reading the twin", self.read_twin(device_id)).await
            }
            HubOp::DeleteDevice { device_id, .. } => {
                self.bounded("deleting the device", self.delete(device_id)).await
            }
            other => Err(self.err(format!("unsupported hub operation {other:?}"))),
        }
    }
}

/// An `Arc` of the adapter, as the routing directory holds it.
pub fn shared(hub: &str, config: MosquittoConfig) -> Arc<MosquittoDirectory> {
    Arc::new(MosquittoDirectory::new(hub, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twin_documents_round_trip() {
        let twin = DeviceTwin { tags: json!({"a": 1}), desired: json!({"b": {"c": 2}}), iot_edge: true };
        assert_eq!(parse_twin(&twin_payload(&twin)).unwrap(), twin);
        let empty = parse_twin(&twin_payload(&DeviceTwin::default())).unwrap();
        assert_eq!((empty.tags, empty.desired, empty.iot_edge), (json!({}), json!({}), false));
        assert!(parse_twin(b"[1]").is_err());
        assert!(parse_twin(b"nope").is_err());
    }

    #[test]
    fn topics_and_roles() {
        assert_eq!(twin_topic("d-1"), "devices/d-1/twin");
        assert_eq!(events_topic("d-1"), "devices/d-1/messages/events/#");
        assert_eq!(role_name("d-1"), "dps-device:d-1");
        let dir = MosquittoDirectory::new(
            "Broker.Local",
            MosquittoConfig {
                host: "127.0.0.1".into(),
                port: 1,
                admin_username: "admin".into(),
                admin_password: Secret::new("hunter2"),
                timeout: DEFAULT_TIMEOUT,
            },
        );
        assert!(
            dir.checked_id("a/b").is_err() && dir.checked_id("a+").is_err() && dir.checked_id("").is_err()
        );
        assert!(!format!("{dir:?}").contains("hunter2"));
    }
}
