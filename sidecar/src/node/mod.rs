//! The binary's modes, composed from the layers below: main relay and home node.

pub mod home;
pub mod main_control;
pub mod main_live;
pub mod main_relay;
pub mod runner;
