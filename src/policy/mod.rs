//! The policy new flows read: the outbounds by name, the rules that pick
//! one, and `route.final` for flows no rule matches.
//!
//! A flow is described by a [`FlowMeta`] (transport, client, original
//! destination, and what sniffing found); [`Policy::decide`] walks the
//! rules in order and returns the first match's outbound. Building a
//! policy checks everything that can only be checked against the system
//! (rule-set files, regexes), so a bad policy is refused at start, never
//! discovered by a flow.

pub mod rules;
pub mod sniff;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{Config, Network, SniffProtocol};
use crate::outbound::{BuildError, Outbound};
use rules::Rules;

/// What the policy knows about a flow when it decides.
#[derive(Debug, Clone, Copy)]
pub struct FlowMeta<'a> {
    pub network: Network,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The host name sniffed from the flow's first bytes (TLS SNI, HTTP
    /// Host), lowercased; None when there was none.
    pub domain: Option<&'a str>,
    pub protocol: Option<SniffProtocol>,
}

impl<'a> FlowMeta<'a> {
    /// A flow known by its addresses only.
    pub fn addresses(network: Network, src: SocketAddr, dst: SocketAddr) -> Self {
        FlowMeta {
            network,
            src,
            dst,
            domain: None,
            protocol: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("outbound {name:?}: {source}")]
    Outbound { name: String, source: BuildError },
    #[error("route.rules[{index}]: {message}")]
    Rule { index: usize, message: String },
    #[error("route.rule_sets[{index}] ({name}): {message}")]
    RuleSet {
        index: usize,
        name: String,
        message: String,
    },
}

/// One outbound the policy can choose, with the name the config gave it.
#[derive(Debug)]
pub struct Named {
    pub name: String,
    pub outbound: Arc<Outbound>,
}

/// Where a decision sends a flow.
#[derive(Debug, Clone)]
pub struct Choice {
    pub outbound: Arc<Outbound>,
    /// Index into the policy's outbounds (for its name).
    pub index: usize,
    /// The rule that matched; None: `route.final`.
    pub rule: Option<usize>,
}

/// The outbounds and the rules, built from a validated config.
#[derive(Debug)]
pub struct Policy {
    outbounds: Vec<Named>,
    rules: Rules,
    /// Outbound index of each rule, in rule order.
    rule_targets: Vec<usize>,
    final_index: usize,
}

impl Policy {
    pub fn from_config(cfg: &Config) -> Result<Policy, PolicyError> {
        let mut outbounds = Vec::with_capacity(cfg.outbounds.len());
        let mut index_of = HashMap::new();
        for o in &cfg.outbounds {
            // Groups resolve to their chosen member; until groups exist a
            // group is refused here like any other unbuilt type.
            let built =
                Outbound::from_kind(&o.kind, cfg.mark, &cfg.timeouts).map_err(|source| {
                    PolicyError::Outbound {
                        name: o.name.clone(),
                        source,
                    }
                })?;
            index_of.insert(o.name.clone(), outbounds.len());
            outbounds.push(Named {
                name: o.name.clone(),
                outbound: Arc::new(built),
            });
        }
        // Validation guarantees every name below exists.
        let lookup = |name: &str| index_of.get(name).copied().unwrap_or(0);
        let rules = Rules::build(&cfg.route)?;
        let rule_targets = cfg
            .route
            .rules
            .iter()
            .map(|r| lookup(&r.outbound))
            .collect();
        Ok(Policy {
            final_index: lookup(&cfg.route.final_outbound),
            outbounds,
            rules,
            rule_targets,
        })
    }

    /// One outbound for every flow, named by its type; no rules.
    pub fn single(outbound: Outbound) -> Policy {
        Policy {
            outbounds: vec![Named {
                name: outbound.name().to_string(),
                outbound: Arc::new(outbound),
            }],
            rules: Rules::default(),
            rule_targets: Vec::new(),
            final_index: 0,
        }
    }

    /// The outbound for a flow: the first rule that matches, else final.
    pub fn decide(&self, flow: &FlowMeta<'_>) -> Choice {
        let rule = self.rules.first_match(flow);
        let index = rule.map_or(self.final_index, |r| self.rule_targets[r]);
        Choice {
            outbound: Arc::clone(&self.outbounds[index].outbound),
            index,
            rule,
        }
    }

    /// Whether any rule looks at the sniffed name or protocol: if none
    /// does, flows need not wait for their first bytes.
    pub fn wants_sniffing(&self) -> bool {
        self.rules.wants_sniffing()
    }

    pub fn outbounds(&self) -> &[Named] {
        &self.outbounds
    }

    /// The name of outbound `index` (from a [`Choice`]).
    pub fn name(&self, index: usize) -> &str {
        self.outbounds.get(index).map_or("?", |n| n.name.as_str())
    }
}
