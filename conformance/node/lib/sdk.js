// Thin helpers over the unmodified Azure IoT Node SDKs, shared by the test files.
'use strict';

const assert = require('node:assert/strict');
const path = require('node:path');

const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http } = require('azure-iot-provisioning-device-http');
const { Mqtt, MqttWs } = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
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

// Provisions one device with the SDK; resolves to the DeviceRegistrationResult (registrationState).
function register(host, registrationId, symmetricKey, transportName, payload) {
  const transport = TRANSPORTS[transportName]();
  const security = new SymmetricKeySecurityClient(registrationId, symmetricKey);
  const client = ProvisioningDeviceClient.create(host, ID_SCOPE, transport, security);
  if (payload !== undefined) client.setProvisioningPayload(payload);
  return client.register();
}

function serviceClient(connectionString) {
  return ProvisioningServiceClient.fromConnectionString(connectionString);
}

// POST /enrollmentGroups (BulkEnrollmentGroupOperation, spec 5.4) through the service SDK's RestApiClient,
// authenticated exactly as ProvisioningServiceClient.fromConnectionString does.
function runBulkEnrollmentGroupOperation(connectionString, operation) {
  const cn = ConnectionString.parse(connectionString);
  const sas = SharedAccessSignature.create(cn.HostName, cn.SharedAccessKeyName, cn.SharedAccessKey, Date.now());
  const rest = new RestApiClient({ host: cn.HostName, sharedAccessSignature: sas }, 'dps-rs-conformance');
  const headers = { Accept: 'application/json', 'Content-Type': 'application/json; charset=utf-8' };
  return new Promise((resolve, reject) => {
    rest.executeApiCall('POST', '/enrollmentGroups?api-version=2021-10-01', headers, operation, (err, body, response) =>
      err ? reject(err) : resolve({ responseBody: body, httpResponse: response }));
  });
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
  register,
  serviceClient,
  runBulkEnrollmentOperation,
  runBulkEnrollmentGroupOperation,
  rejectsWithStatus,
  assertAssigned,
  symmetricKeyAttestation,
  drainQuery,
};
