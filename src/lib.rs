//! turnserver: a TURN/STUN relay (RFC 8489, RFC 8656).
//!
//! Layers, each depending only on those above it in this list:
//!
//! * [`wire`]: zero-copy STUN/TURN codec. No I/O, no clock.
//! * [`auth`]: long-term credentials and stateless nonces. No I/O, no clock.
//! * [`config`]: the TOML configuration and its validation.
//! * [`core`]: the sans-IO server: allocations, permissions, channels, ports, timers.
//!   Time is an input (`now`); outputs are return values written into caller buffers.
//! * [`net`]: tokio drivers that own the sockets and buffers and feed the core.
//!
//! # The drive-loop contract
//!
//! A driver owns one [`core::Server`]. For every datagram or stream frame from a client it calls
//! [`core::Server::handle_client`] and performs the returned [`core::ClientAction`]: send the
//! reply it wrote, or send a byte range of the input to a peer from a relay socket. For every
//! datagram received on a relay socket, received at offset [`wire::HEADROOM`] of its buffer, it
//! calls [`core::Server::handle_peer`], which writes the ChannelData or Data indication header
//! in front of the payload and says which client to send it to. It calls
//! [`core::Server::handle_timeout`] no later than [`core::Server::poll_timeout`]. Relay sockets
//! are opened and closed through the [`core::RelaySockets`] the driver passes in.

#![forbid(unsafe_code)]

pub mod auth;
pub mod bench;
pub mod config;
pub mod core;
pub mod credentials;
pub mod daemon;
pub mod hash_password;
pub mod migrate;
pub mod net;
pub mod probe;
pub mod wire;
