//! Link addresses (spec §3.2): the four SDK spellings of `{idScope}/registrations/{registrationId}`.

use dps_core::proto::{IdScope, RegistrationId};
use dps_core::{DpsError, ErrorCode};

/// The device a link addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkAddress {
    /// The ID scope.
    pub id_scope: IdScope,
    /// The registration ID.
    pub registration_id: RegistrationId,
}

/// Parses a link address in any SDK spelling: `amqps://{host}/{scope}/registrations/{id}` (C),
/// `{scope}/registrations/{id}` (C#, Node), `/{scope}/registrations/{id}` (Java); a trailing `/` and any
/// case of `registrations` are accepted.
///
/// Errors: `404000` when the address is not a registration address, `400002` when the scope or
/// registration ID breaks the identifier rules.
pub fn normalize_address(address: &str) -> Result<LinkAddress, DpsError> {
    let not_found = || {
        DpsError::with_message(
            ErrorCode::NotFound,
            format!(
                "the link address '{}' is not '{{idScope}}/registrations/{{registrationId}}'",
                shown(address)
            ),
        )
    };
    let mut rest = address;
    for scheme in ["amqps://", "amqp://", "wss://"] {
        if rest.len() >= scheme.len() && rest[..scheme.len()].eq_ignore_ascii_case(scheme) {
            // Drop the scheme and the host (everything up to the next '/').
            let after = &rest[scheme.len()..];
            rest = after.find('/').map_or("", |i| &after[i..]);
            break;
        }
    }
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let mut parts = rest.split('/');
    let (Some(scope), Some(literal), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_found());
    };
    if !literal.eq_ignore_ascii_case("registrations") {
        return Err(not_found());
    }
    Ok(LinkAddress { id_scope: IdScope::parse(scope)?, registration_id: RegistrationId::parse(id)? })
}

/// At most 200 characters of a client-supplied string, for messages.
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 200;
    if s.chars().count() > MAX {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_sdk_spellings_name_the_same_device() {
        for a in [
            "amqps://global.azure-devices-provisioning.net/0ne00000001/registrations/dev-1",
            "AMQPS://localhost:5671/0ne00000001/registrations/dev-1",
            "0ne00000001/registrations/dev-1",
            "/0ne00000001/registrations/dev-1",
            "0ne00000001/Registrations/dev-1/",
        ] {
            let parsed = normalize_address(a).unwrap();
            assert_eq!(parsed.id_scope.as_str(), "0ne00000001", "{a}");
            assert_eq!(parsed.registration_id.as_str(), "dev-1", "{a}");
        }
    }

    #[test]
    fn other_addresses_are_refused_with_stable_codes() {
        for a in [
            "",
            "/",
            "$cbs",
            "0ne00000001",
            "0ne00000001/registrations",
            "0ne00000001/devices/dev-1",
            "0ne00000001/registrations/dev-1/extra",
            "amqps://host",
            "amqps://host/",
        ] {
            assert_eq!(normalize_address(a).unwrap_err().code, ErrorCode::NotFound, "{a}");
        }
        assert_eq!(
            normalize_address("0ne00000001/registrations/bad id!").unwrap_err().code,
            ErrorCode::InvalidIdentifier
        );
        assert_eq!(
            normalize_address(&format!("0ne00000001/registrations/{}", "a".repeat(129))).unwrap_err().code,
            ErrorCode::InvalidIdentifier
        );
    }
}
