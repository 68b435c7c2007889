// Thin helpers over the unmodified Azure IoT Node SDKs, shared by the test files.
'use strict';

const assert = require('node:assert/strict');
const path = require('node:path');

const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http } = require('azure-iot-provisioning-device-http');
const { Mqtt, MqttWs } = require('azure-iot-provisioning-device-mqtt');
const { Amqp, AmqpWs } = require('azure-iot-provisioning-device-amqp');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { X509Security } = require('azure-iot-security-x509');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');

const { ID_SCOPE, LINKED_HUBS } = require('./harness');

// The HTTP plumbing the service SDK itself uses (its own copy of azure-iot-http-base / azure-iot-common), for
// the one service call the Node service SDK has no method for: bulk operations on enrollment groups.
const serviceDir = path.dirname(require.resolve('azure-iot-provisioning-service/package.json'));
const { RestApiClient } = require(require.resolve('azure-iot-http-base', { paths: [serviceDir] }));
const { ConnectionString, SharedAccessSignature } = require(require.resolve('azure-iot-common', { paths: [serviceDir] }));

const TRANSPORTS = {
  http: () => new Http(),
  mqtt: () => new Mqtt(),
  'mqtt-ws': () => new MqttWs(),
};

// AMQP 1.0 (spec 3): over TLS on 5671 and over WebSocket on 443 (subprotocol AMQPWSB10). Kept apart from
// TRANSPORTS so the suites written before AMQP keep their scope; the AMQP test files iterate these.
const AMQP_TRANSPORTS = {
  amqp: () => new Amqp(),
  'amqp-ws': () => new AmqpWs(),
};

function transportFor(name) {
  const make = TRANSPORTS[name] || AMQP_TRANSPORTS[name];
  if (!make) throw new Error(`unknown transport ${name}`);
  return make();
}

// Provisions one device with the SDK; resolves to the DeviceRegistrationResult (registrationState).
function register(host, registrationId, symmetricKey, transportName, payload) {
  const transport = transportFor(transportName);
  const security = new SymmetricKeySecurityClient(registrationId, symmetricKey);
  const client = ProvisioningDeviceClient.create(host, ID_SCOPE, transport, security);
  if (payload !== undefined) client.setProvisioningPayload(payload);
  return client.register();
}

// Provisions one X.509 device with the SDK: `credentials` = { cert, key } (PEM texts; `cert` is what the device
// presents in TLS, its certificate followed by its intermediates). Resolves to the DeviceRegistrationResult.
function registerX509(host, registrationId, credentials, transportName, payload) {
  const transport = transportFor(transportName);
  const security = new X509Security(registrationId, { cert: credentials.cert, key: credentials.key });
  const client = ProvisioningDeviceClient.create(host, ID_SCOPE, transport, security);
  if (payload !== undefined) client.setProvisioningPayload(payload);
  return client.register();
}

function serviceClient(connectionString) {
  return ProvisioningServiceClient.fromConnectionString(connectionString);
}

// One service API call (`path` without the api-version) through the service SDK's own RestApiClient, authenticated
// exactly as ProvisioningServiceClient.fromConnectionString does. Resolves to { responseBody, httpResponse };
// rejects with the RestApiClient's error (`response`, `responseBody`) for a status >= 300.
function serviceCall(connectionString, method, path, body, headers = {}) {
  const cn = ConnectionString.parse(connectionString);
  const sas = SharedAccessSignature.create(cn.HostName, cn.SharedAccessKeyName, cn.SharedAccessKey, Date.now());
  const rest = new RestApiClient({ host: cn.HostName, sharedAccessSignature: sas }, 'dps-rs-conformance');
  const allHeaders = { Accept: 'application/json', 'Content-Type': 'application/json; charset=utf-8', ...headers };
  return new Promise((resolve, reject) => {
    rest.executeApiCall(method, `${path}?api-version=2021-10-01`, allHeaders, body, (err, responseBody, response) =>
      err ? reject(err) : resolve({ responseBody, httpResponse: response }));
  });
}

// POST /enrollmentGroups (BulkEnrollmentGroupOperation, spec 5.4): the Node service SDK has no method for it.
function runBulkEnrollmentGroupOperation(connectionString, operation) {
  return serviceCall(connectionString, 'POST', '/enrollmentGroups', operation);
}

// The CA certificate API (spec 5.7, 7.3), which the Node service SDK does not cover (in Azure it is ARM's).
function certificatePath(name, action) {
  return `/certificates/${encodeURIComponent(name)}${action ? `/${action}` : ''}`;
}

const certificates = {
  put: (connectionString, name, certificate, isVerified = false) =>
    serviceCall(connectionString, 'PUT', certificatePath(name), { properties: { certificate, isVerified } }),
  get: (connectionString, name) => serviceCall(connectionString, 'GET', certificatePath(name)),
  list: (connectionString) => serviceCall(connectionString, 'GET', '/certificates'),
  generateVerificationCode: (connectionString, name, etag) =>
    serviceCall(connectionString, 'POST', certificatePath(name, 'generateVerificationCode'), undefined,
      { 'If-Match': etag }),
  verify: (connectionString, name, etag, certificate) =>
    serviceCall(connectionString, 'POST', certificatePath(name, 'verify'), { certificate }, { 'If-Match': etag }),
  delete: (connectionString, name, etag) =>
    serviceCall(connectionString, 'DELETE', certificatePath(name), undefined, { 'If-Match': etag }),
};

// Uploads the CA `ca` (a harness.Pki result) unverified, then verifies it by proof of possession (spec 7.3):
// generateVerificationCode, a certificate with CN = the code signed by the CA's key, verify. Resolves to the
// verified certificate's body.
async function uploadVerifiedCa(connectionString, pki, name, ca) {
  const { responseBody: uploaded } = await certificates.put(connectionString, name, ca.certPem);
  assert.equal(uploaded.properties.isVerified, false, JSON.stringify(uploaded));
  const { responseBody: coded } = await certificates.generateVerificationCode(connectionString, name, uploaded.etag);
  const code = coded.properties.verificationCode;
  assert.ok(code, JSON.stringify(coded));
  const proof = pki.proof(ca, code);
  const { responseBody: verified } = await certificates.verify(connectionString, name, coded.etag, proof.certPem);
  assert.equal(verified.properties.isVerified, true, JSON.stringify(verified));
  return verified;
}

// An X509CertificateInfo (spec 5.6; all eight fields) describes the certificate `made` (a harness.Pki result).
function assertCertificateInfo(info, made) {
  assert.ok(info, 'no X509CertificateInfo');
  assert.equal(info.subjectName, `CN=${made.cn}`, JSON.stringify(info));
  assert.equal(info.issuerName, `CN=${made.issuer}`, JSON.stringify(info));
  assert.equal(info.sha1Thumbprint.toUpperCase(), made.sha1Thumbprint, JSON.stringify(info));
  assert.equal(info.sha256Thumbprint.toUpperCase(), made.sha256Thumbprint, JSON.stringify(info));
  assert.equal(BigInt(`0x${info.serialNumber}`), BigInt(`0x${made.serialNumber}`), JSON.stringify(info));
  assert.equal(Date.parse(info.notBeforeUtc), Date.parse(made.notBeforeUtc), JSON.stringify(info));
  assert.equal(Date.parse(info.notAfterUtc), Date.parse(made.notAfterUtc), JSON.stringify(info));
  assert.equal(info.version, 3, JSON.stringify(info));
}

// ProvisioningServiceClient.runBulkEnrollmentOperation with a callback: its promise form never settles (the SDK
// only calls back `if (callback)`, which is undefined in the promise form). Resolves like the other methods.
function runBulkEnrollmentOperation(service, operation) {
  return new Promise((resolve, reject) => {
    service.runBulkEnrollmentOperation(operation, (err, result, response) =>
      err ? reject(err) : resolve({ responseBody: result, httpResponse: response }));
  });
}

// Asserts that `promise` rejects with an HTTP error of `status`, and (if given) the DPS `errorCode` in the body
// (spec 1.8: errorCode / 1000 == status). Returns the error.
async function rejectsWithStatus(promise, status, errorCode) {
  let error;
  try {
    await promise;
  } catch (e) {
    error = e;
  }
  assert.ok(error, `expected an HTTP ${status} error, the call succeeded`);
  const response = error.response || error.transportObject;
  assert.ok(response, `expected an HTTP ${status} error, got ${error.stack || error}`);
  assert.equal(response.statusCode, status, `status: ${error.message} ${error.responseBody || ''}`);
  if (errorCode !== undefined) {
    const body = JSON.parse(error.responseBody);
    assert.equal(body.errorCode, errorCode, `errorCode: ${error.responseBody}`);
    assert.equal(Math.floor(body.errorCode / 1000), status);
    assert.ok(body.trackingId, 'error body has a trackingId');
    assert.ok(body.message, 'error body has a message');
  }
  return error;
}

// The SDK result says assigned to one of `hubs` as `deviceId` with `substatus`, and the service API's
// registration state agrees. Resolves to the service's DeviceRegistrationState.
async function assertAssigned(service, result, registrationId, options = {}) {
  const deviceId = options.deviceId || registrationId;
  const hubs = options.hubs || LINKED_HUBS;
  const substatus = options.substatus || 'initialAssignment';
  assert.ok(result, 'register() resolved without a result');
  assert.equal(result.status, 'assigned', JSON.stringify(result));
  assert.equal(result.registrationId.toLowerCase(), registrationId.toLowerCase());
  assert.ok(hubs.includes(result.assignedHub), `assignedHub ${result.assignedHub} not in ${hubs}`);
  assert.equal(result.deviceId, deviceId);
  assert.equal(result.substatus, substatus, JSON.stringify(result));
  assert.ok(result.createdDateTimeUtc && result.lastUpdatedDateTimeUtc && result.etag, JSON.stringify(result));

  const { responseBody: state } = await service.getDeviceRegistrationState(registrationId);
  assert.equal(state.registrationId.toLowerCase(), registrationId.toLowerCase());
  assert.equal(state.status, 'assigned');
  assert.equal(state.assignedHub, result.assignedHub);
  assert.equal(state.deviceId, deviceId);
  assert.equal(state.substatus, substatus);
  assert.ok(state.etag, JSON.stringify(state));
  return state;
}

function symmetricKeyAttestation(primaryKey, secondaryKey) {
  return { type: 'symmetricKey', symmetricKey: { primaryKey, secondaryKey } };
}

// Every item of a service SDK query, following `x-ms-continuation` pages. Resolves to { items, pages }.
async function drainQuery(query) {
  const items = [];
  const pages = [];
  for (let i = 0; i < 100 && query.hasMoreResults; i++) {
    // Pass the token explicitly: the SDK's promise form of next() without arguments drops it.
    const { responseBody, httpResponse } = await query.next(query.continuationToken);
    assert.ok(Array.isArray(responseBody), `query page is not an array: ${JSON.stringify(responseBody)}`);
    pages.push({ count: responseBody.length, itemType: httpResponse.headers['x-ms-item-type'] });
    items.push(...responseBody);
  }
  assert.equal(query.hasMoreResults, false, 'query never ended (more than 100 pages)');
  return { items, pages };
}

module.exports = {
  TRANSPORTS,
  AMQP_TRANSPORTS,
  register,
  registerX509,
  serviceClient,
  serviceCall,
  certificates,
  uploadVerifiedCa,
  assertCertificateInfo,
  runBulkEnrollmentOperation,
  runBulkEnrollmentGroupOperation,
  rejectsWithStatus,
  assertAssigned,
  symmetricKeyAttestation,
  drainQuery,
};
