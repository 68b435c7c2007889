// Azure IoT Node device SDK (azure-iot-provisioning-device + -http / -mqtt transports + azure-iot-security-x509)
// against dps-server: X.509 attestation (spec section 7) over HTTPS (443), MQTT (8883) and MQTT over WebSocket
// (443). The device authenticates with its TLS client certificate only (`new X509Security(registrationId,
// { cert: <certificate + intermediates>, key })`); certificates come from conformance/pki.py; CA certificates are
// uploaded and verified by proof of possession through the service API (spec 5.7, 7.3).
'use strict';

const harness = require('../lib/harness');
if (harness.wrapTestFile(__filename, '127.0.0.23')) return;

const assert = require('node:assert/strict');
const { after, test } = require('node:test');
const sdk = require('../lib/sdk');
const { uniqueId } = harness;

const dps = harness.server();
const service = sdk.serviceClient(dps.connectionString);
const pki = new harness.Pki();
after(() => pki.cleanup());

const INVALID_CERTIFICATE = 401002;

// What the device presents: its certificate followed by its intermediates (or, with `leafOnly`, the leaf alone).
function credentials(device, leafOnly = false) {
  return { cert: leafOnly ? device.certPem : device.chainPem, key: device.keyPem };
}

function x509Attestation(field, primary, secondary) {
  const certificates = { primary: { certificate: primary } };
  if (secondary) certificates.secondary = { certificate: secondary };
  return { type: 'x509', x509: { [field]: certificates } };
}

function base64Der(pem) {
  return pem.split('\n').filter((line) => line && !line.startsWith('-----')).join('');
}

// A certificate refusal over MQTT: the server accepts the CONNECT and answers the register request on
// `$dps/registrations/res/401/` (spec 2.6, 7.5); the SDK's UnauthorizedError carries the response body.
async function rejectsOverMqtt(promise, errorCode) {
  let error;
  try {
    await promise;
  } catch (e) {
    error = e;
  }
  assert.ok(error, 'expected the registration to fail, it succeeded');
  assert.ok(!/Connection refused/i.test(error.message),
    'the server refused the MQTT CONNECT (CONNACK 5) instead of accepting it and answering the register request ' +
    `on $dps/registrations/res/401/ with errorCode ${errorCode} (spec 2.6, 7.5): ${error.message}`);
  assert.equal(error.name, 'UnauthorizedError', error.stack || String(error));
  assert.equal(error.result && error.result.errorCode, errorCode, JSON.stringify(error.result));
  return error;
}

async function groupMembers(enrollmentGroupId) {
  const { items } = await sdk.drainQuery(
    service.createEnrollmentGroupDeviceRegistrationStateQuery({ query: 'SELECT * FROM enrollmentGroups' },
      enrollmentGroupId, 10));
  return items.map((s) => s.registrationId).sort();
}

for (const transport of Object.keys(sdk.TRANSPORTS)) {
  test(`${transport}: individual enrollment, self-signed device certificate`, async () => {
    const registrationId = uniqueId(`node-${transport}-x509-self`);
    const device = pki.selfSigned(registrationId, { key: transport === 'mqtt' ? 'rsa' : 'ec' });
    await service.createOrUpdateIndividualEnrollment({
      registrationId,
      attestation: x509Attestation('clientCertificates', device.certPem, pki.selfSigned(registrationId,
        { name: `${registrationId}-other` }).certPem),
    });

    const result = await sdk.registerX509(dps.ip, registrationId, credentials(device), transport);

    await sdk.assertAssigned(service, result, registrationId);
    assert.ok(result.x509, `no registrationState.x509: ${JSON.stringify(result)}`);
    sdk.assertCertificateInfo(result.x509.certificateInfo, device);
    assert.equal(result.x509.enrollmentGroupId, undefined, JSON.stringify(result.x509));
  });

  test(`${transport}: individual enrollment, CA-signed device certificate (root verified by proof of possession)`,
    async () => {
      const root = pki.root(uniqueId('node-root'));
      const int1 = pki.intermediate(root, uniqueId('node-int1'));
      await sdk.uploadVerifiedCa(dps.connectionString, pki, uniqueId('node-ca'), root);
      const registrationId = uniqueId(`node-${transport}-x509-ca`);
      const device = pki.device(int1, registrationId, { key: transport === 'http' ? 'rsa' : 'ec' });
      // The enrolled certificate as base64 DER without PEM armour (what the C# service SDK sends).
      await service.createOrUpdateIndividualEnrollment({
        registrationId,
        attestation: x509Attestation('clientCertificates', base64Der(device.certPem)),
      });

      const result = await sdk.registerX509(dps.ip, registrationId, credentials(device), transport);

      await sdk.assertAssigned(service, result, registrationId);
      sdk.assertCertificateInfo(result.x509.certificateInfo, device);
      assert.equal(result.x509.certificateInfo.issuerName, `CN=${int1.cn}`);
    });

  test(`${transport}: enrollment group on a verified root, device sends leaf + intermediate2 + intermediate1`,
    async () => {
      const root = pki.root(uniqueId('node-root'));
      const int1 = pki.intermediate(root, uniqueId('node-int1'));
      const int2 = pki.intermediate(int1, uniqueId('node-int2'));
      await sdk.uploadVerifiedCa(dps.connectionString, pki, uniqueId('node-ca'), root);
      const enrollmentGroupId = uniqueId(`node-${transport}-x509-group`);
      await service.createOrUpdateEnrollmentGroup({
        enrollmentGroupId,
        attestation: x509Attestation('signingCertificates', root.certPem),
      });
      const device = pki.device(int2, uniqueId(`node-${transport}-x509-gdev`));
      assert.equal(device.chainPem.split('BEGIN CERTIFICATE').length - 1, 3);

      const result = await sdk.registerX509(dps.ip, device.cn, credentials(device), transport);

      await sdk.assertAssigned(service, result, device.cn);
      assert.equal(result.x509.enrollmentGroupId, enrollmentGroupId, JSON.stringify(result.x509));
      sdk.assertCertificateInfo(result.x509.certificateInfo, device);
      sdk.assertCertificateInfo(result.x509.signingCertificateInfo, root);
      assert.deepEqual(await groupMembers(enrollmentGroupId), [device.cn]);
    });
}

test('http: a device of an uploaded but unverified CA gets 401 / 401002 and no registration', async () => {
  const root = pki.root(uniqueId('node-root'));
  const name = uniqueId('node-ca');
  const { responseBody: uploaded } = await sdk.certificates.put(dps.connectionString, name, root.certPem);
  assert.equal(uploaded.properties.isVerified, false);
  const registrationId = uniqueId('node-x509-unverified');
  const device = pki.device(root, registrationId);
  await service.createOrUpdateIndividualEnrollment({
    registrationId,
    attestation: x509Attestation('clientCertificates', device.certPem),
  });

  await sdk.rejectsWithStatus(sdk.registerX509(dps.ip, registrationId, credentials(device), 'http'), 401,
    INVALID_CERTIFICATE);

  await sdk.rejectsWithStatus(service.getDeviceRegistrationState(registrationId), 404, 404203);
});

test('mqtt: a group on an unverified CA refuses with 401002 until the CA is verified', async () => {
  const root = pki.root(uniqueId('node-root'));
  const int1 = pki.intermediate(root, uniqueId('node-int1'));
  const name = uniqueId('node-ca');
  const { responseBody: uploaded } = await sdk.certificates.put(dps.connectionString, name, root.certPem);
  const enrollmentGroupId = uniqueId('node-x509-ugroup');
  await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId,
    attestation: { type: 'x509', x509: { caReferences: { primary: name } } },
  });
  const device = pki.device(int1, uniqueId('node-x509-udev'));

  await rejectsOverMqtt(sdk.registerX509(dps.ip, device.cn, credentials(device), 'mqtt'), INVALID_CERTIFICATE);
  await sdk.rejectsWithStatus(service.getDeviceRegistrationState(device.cn), 404, 404203);

  const { responseBody: coded } = await sdk.certificates.generateVerificationCode(dps.connectionString, name,
    uploaded.etag);
  const proof = pki.proof(root, coded.properties.verificationCode);
  await sdk.certificates.verify(dps.connectionString, name, coded.etag, proof.certPem);
  const result = await sdk.registerX509(dps.ip, device.cn, credentials(device), 'mqtt');
  await sdk.assertAssigned(service, result, device.cn);
  assert.equal(result.x509.enrollmentGroupId, enrollmentGroupId);
});

test('http: a group device that sends only its leaf gets 401 / 401002; with its chain it is assigned', async () => {
  const root = pki.root(uniqueId('node-root'));
  const int1 = pki.intermediate(root, uniqueId('node-int1'));
  const int2 = pki.intermediate(int1, uniqueId('node-int2'));
  await sdk.uploadVerifiedCa(dps.connectionString, pki, uniqueId('node-ca'), root);
  const enrollmentGroupId = uniqueId('node-x509-leafonly');
  await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId,
    attestation: x509Attestation('signingCertificates', root.certPem),
  });
  const device = pki.device(int2, uniqueId('node-x509-lonely'));

  await sdk.rejectsWithStatus(sdk.registerX509(dps.ip, device.cn, credentials(device, true), 'http'), 401,
    INVALID_CERTIFICATE);

  const result = await sdk.registerX509(dps.ip, device.cn, credentials(device), 'http');
  await sdk.assertAssigned(service, result, device.cn);
});

test('http: a certificate whose CN is not the registration ID gets 401 / 401002', async () => {
  const registrationId = uniqueId('node-x509-rid');
  const device = pki.selfSigned(uniqueId('node-x509-cn'));
  await service.createOrUpdateIndividualEnrollment({
    registrationId,
    attestation: x509Attestation('clientCertificates', device.certPem),
  });

  await sdk.rejectsWithStatus(sdk.registerX509(dps.ip, registrationId, credentials(device), 'http'), 401,
    INVALID_CERTIFICATE);
});
