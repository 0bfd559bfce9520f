//! The checks a snapshot passes before a node binds any port: each failure names the field.

use super::*;

impl Snapshot {
    /// Cross-field checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.schema != SNAPSHOT_SCHEMA {
            return Err(invalid("schema", format!("{} is not supported; expected {SNAPSHOT_SCHEMA}", self.schema)));
        }
        let label_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !label_ok(&self.node.id) {
            return Err(invalid("node.id", format!("{:?} is not a DNS label", self.node.id)));
        }
        match self.node.role {
            Role::Main => {
                if self.listen.is_none() {
                    return Err(invalid("listen", "a main relay needs a QUIC listen address"));
                }
                if !self.imports.is_empty() || !self.exports.is_empty() {
                    return Err(invalid("imports/exports", "main relays only route; move them to a home node"));
                }
            }
            Role::Home => {
                if self.main_relays.is_empty() {
                    return Err(invalid("mainRelays", "a home node needs at least one main relay"));
                }
                if self.noise_key_file.is_none() && (!self.imports.is_empty() || !self.exports.is_empty()) {
                    return Err(invalid("noiseKeyFile", "required for end-to-end sessions"));
                }
            }
        }
        for (i, imp) in self.imports.iter().enumerate() {
            match (&imp.node, &imp.main, &imp.noise_public_key) {
                (None, None, None) => {}
                (Some(node), Some(main), Some(key)) => {
                    if decode_key32(key).is_none() {
                        return Err(invalid(format!("imports[{i}].noisePublicKey"), "must be 32 bytes, base64"));
                    }
                    if !label_ok(node) || !label_ok(main) {
                        return Err(invalid(format!("imports[{i}]"), "node and main must be DNS labels"));
                    }
                }
                _ => {
                    return Err(invalid(
                        format!("imports[{i}]"),
                        "set node, main and noisePublicKey together (a fixed destination) or none (resolved through the registry)",
                    ));
                }
            }
        }
        for (i, p) in self.peers.iter().enumerate() {
            if !label_ok(&p.node_id) || p.node_id == self.node.id {
                return Err(invalid(format!("peers[{i}].nodeId"), "must be another main relay's node id"));
            }
            if let Some(bad) = std::iter::once(&p.endpoint)
                .chain(&p.fallback_endpoints)
                .find(|e| super::policy::split_endpoint(e).is_none())
            {
                return Err(invalid(format!("peers[{i}].endpoint"), format!("{bad:?} is not host:port")));
            }
            if let Some(pin) = &p.pin {
                if pin.trust_domain.is_empty() || pin.trust_domain == self.node.trust_domain {
                    return Err(invalid(
                        format!("peers[{i}].pin.trustDomain"),
                        "a pin is for a relay of another trust domain",
                    ));
                }
                if pin.ca_bundle.is_none() && pin.fingerprints.is_empty() {
                    return Err(invalid(format!("peers[{i}].pin"), "set caBundle or fingerprints"));
                }
                if let Some(bad) = pin.fingerprints.iter().find(|f| super::policy::parse_fingerprint(f).is_none()) {
                    return Err(invalid(
                        format!("peers[{i}].pin.fingerprints"),
                        format!("{bad:?} is not sha256:<64 hex>"),
                    ));
                }
            }
        }
        for (i, p) in self.partners.iter().enumerate() {
            if self.node.role != Role::Home {
                return Err(invalid("partners", "only home nodes verify other federations' homes"));
            }
            if p.relays.is_empty() || !p.relays.iter().all(|r| label_ok(r)) {
                return Err(invalid(format!("partners[{i}].relays"), "one or more main relay node ids"));
            }
            if p.pin.trust_domain.is_empty() || p.pin.trust_domain == self.node.trust_domain {
                return Err(invalid(format!("partners[{i}].pin.trustDomain"), "another federation's trust domain"));
            }
            if p.pin.ca_bundle.is_none() && p.pin.fingerprints.is_empty()
                || p.pin.fingerprints.iter().any(|f| super::policy::parse_fingerprint(f).is_none())
            {
                return Err(invalid(format!("partners[{i}].pin"), "caBundle or sha256:<64 hex> fingerprints"));
            }
        }
        if self.registry.ttl_seconds < 2 {
            return Err(invalid("registry.ttlSeconds", "must be at least 2"));
        }
        for (main, list) in &self.ech_configs {
            if !label_ok(main) {
                return Err(invalid(format!("echConfigs.{main}"), "the key must be a main relay's node id"));
            }
            let bytes = base64_decode(list).ok_or_else(|| invalid(format!("echConfigs.{main}"), "not base64"))?;
            crate::protocol::EchConfigList::decode(&bytes)
                .map_err(|e| invalid(format!("echConfigs.{main}"), e.to_string()))?;
        }
        if let Some(a) = &self.ech_announcement {
            if self.node.role != Role::Main {
                return Err(invalid("echAnnouncement", "only main relays announce an ECH config"));
            }
            let bytes = base64_decode(&a.ech_config_list)
                .ok_or_else(|| invalid("echAnnouncement.echConfigList", "not base64"))?;
            crate::protocol::EchConfigList::decode(&bytes)
                .map_err(|e| invalid("echAnnouncement.echConfigList", e.to_string()))?;
            base64_decode(&a.signature).ok_or_else(|| invalid("echAnnouncement.signature", "not base64"))?;
        }
        if let Some(ic) = &self.intercept {
            if self.node.role != Role::Home {
                return Err(invalid("intercept", "only home nodes intercept application traffic"));
            }
            for (i, c) in ic.exclude_cidrs.iter().enumerate() {
                if crate::intercept::parse_cidr(c).is_none() {
                    return Err(invalid(format!("intercept.excludeCidrs[{i}]"), format!("{c:?} is not an IP/prefix")));
                }
            }
            let mut seen = std::collections::HashSet::new();
            for (i, imp) in self.imports.iter().enumerate() {
                if let Some(ip) = imp.cluster_ip
                    && !seen.insert(ip)
                {
                    return Err(invalid(format!("imports[{i}].clusterIp"), format!("{ip} is used by two imports")));
                }
            }
            if ic.scope == InterceptScope::Imports && self.imports.iter().all(|i| i.cluster_ip.is_none()) {
                return Err(invalid("intercept.scope", "scope imports needs at least one import with a clusterIp"));
            }
        }
        if self.ech_policy.percentage > 100 {
            return Err(invalid("echPolicy.percentage", "must be 0-100"));
        }
        Ok(())
    }
}
