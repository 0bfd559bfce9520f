//! Who may register what at a main relay: pure decisions over the plan's assignment
//! (`trust.homes`), the home's authenticated node id, the Noise key its certificate binds and
//! the services it asks for. The relay's control stream applies them (`relay/homes.rs`);
//! every refusal has a rule name, counted as `relayfed_relay_trust_denials_total{rule}`.

use std::collections::BTreeMap;

use crate::protocol::control::Service;

/// Why a home's connection or registration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The plan does not assign this home to this relay.
    NotPlannedHere,
    /// The plan is in force and the home's certificate binds no Noise key.
    NoiseKeyUnbound,
    /// The registered Noise key differs from the one the certificate binds.
    NoiseKeyBinding,
    /// The certificate's Noise-key extension is malformed.
    NoiseKeyMalformed,
}

impl Refusal {
    /// The rule label (metrics, logs, the connection close reason).
    pub fn rule(self) -> &'static str {
        match self {
            Self::NotPlannedHere => "not_planned_here",
            Self::NoiseKeyUnbound => "noise_key_unbound",
            Self::NoiseKeyBinding => "noise_key_binding",
            Self::NoiseKeyMalformed => "noise_key_malformed",
        }
    }
}

/// Whether `node` may connect as a home: with a plan in force, only homes it assigns here.
pub fn admit_home(planned: Option<&BTreeMap<String, Vec<String>>>, node: &str) -> Result<(), Refusal> {
    match planned {
        Some(homes) if !homes.contains_key(node) => Err(Refusal::NotPlannedHere),
        _ => Ok(()),
    }
}

/// Whether `registered` (the 32-byte Noise key a home registers) may be used, given what its
/// certificate binds (`bound`: `Ok(None)` when the certificate has no binding). With a plan in
/// force the binding is required.
pub fn check_noise_key(
    plan_in_force: bool,
    bound: Result<Option<[u8; 32]>, ()>,
    registered: &[u8],
) -> Result<(), Refusal> {
    match bound {
        Err(()) => Err(Refusal::NoiseKeyMalformed),
        Ok(None) if plan_in_force => Err(Refusal::NoiseKeyUnbound),
        Ok(None) => Ok(()),
        Ok(Some(key)) if key[..] == *registered => Ok(()),
        Ok(Some(_)) => Err(Refusal::NoiseKeyBinding),
    }
}

/// Splits the services `node` asks to register into those the plan grants it and those it
/// does not (all are granted without a plan).
pub fn granted(
    planned: Option<&BTreeMap<String, Vec<String>>>,
    node: &str,
    services: Vec<Service>,
) -> (Vec<Service>, Vec<Service>) {
    let Some(homes) = planned else { return (services, vec![]) };
    let grants = homes.get(node).map(Vec::as_slice).unwrap_or_default();
    services.into_iter().partition(|s| grants.iter().any(|g| *g == format!("{}:{}", s.service, s.port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([("pay".to_owned(), vec!["payments:9090".to_owned()]), ("shop".to_owned(), vec![])])
    }

    fn svc(name: &str, port: u16) -> Service {
        Service { service: name.into(), port, ech: true }
    }

    #[test]
    fn only_planned_homes_connect_when_a_plan_is_in_force() {
        assert_eq!(admit_home(Some(&plan()), "pay"), Ok(()));
        assert_eq!(admit_home(Some(&plan()), "shop"), Ok(()), "a home without exports is still planned");
        assert_eq!(admit_home(Some(&plan()), "mallory"), Err(Refusal::NotPlannedHere));
        assert_eq!(admit_home(None, "mallory"), Ok(()));
    }

    #[test]
    fn only_granted_exports_are_registered() {
        let (ok, refused) =
            granted(Some(&plan()), "pay", vec![svc("payments", 9090), svc("payments", 9091), svc("ledger", 1)]);
        assert_eq!(ok, [svc("payments", 9090)]);
        assert_eq!(refused, [svc("payments", 9091), svc("ledger", 1)]);
        let (ok, refused) = granted(Some(&plan()), "shop", vec![svc("payments", 9090)]);
        assert!(ok.is_empty() && refused.len() == 1, "shop may not claim pay's service");
        let (ok, refused) = granted(None, "anyone", vec![svc("x", 1)]);
        assert_eq!((ok.len(), refused.len()), (1, 0));
    }

    #[test]
    fn the_noise_key_must_be_the_bound_one_and_bound_when_planned() {
        let k = [7u8; 32];
        assert_eq!(check_noise_key(true, Ok(Some(k)), &k), Ok(()));
        assert_eq!(check_noise_key(true, Ok(Some(k)), &[8u8; 32]), Err(Refusal::NoiseKeyBinding));
        assert_eq!(check_noise_key(false, Ok(Some(k)), &[8u8; 32]), Err(Refusal::NoiseKeyBinding));
        assert_eq!(check_noise_key(true, Ok(None), &k), Err(Refusal::NoiseKeyUnbound));
        assert_eq!(check_noise_key(false, Ok(None), &k), Ok(()));
        assert_eq!(check_noise_key(false, Err(()), &k), Err(Refusal::NoiseKeyMalformed));
        assert_eq!(check_noise_key(true, Ok(Some(k)), b"short"), Err(Refusal::NoiseKeyBinding));
    }
}
