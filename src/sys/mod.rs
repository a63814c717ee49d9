//! The one room for system calls and socket options.
//!
//! Everything that touches the kernel below the level of `std`/`tokio`
//! sockets lives here behind safe functions: transparent sockets, original
//! destination lookups, control messages, marks, capabilities and limits.
//! The rest of the crate never calls `libc` or `nix` directly, and
//! `unsafe` appears nowhere else, so this folder is the only place to
//! audit for kernel-facing mistakes.
//!
//! One file per concern; the rest of the crate names everything as
//! `crate::sys::name`, re-exported below, never through the file:
//!
//! - `socket`: listeners, marked outbound and reply sockets, the REDIRECT
//!   original destination, peek and half-close, address forms;
//! - `cmsg`: `recvmsg` and the TPROXY original destination in its
//!   control messages;
//! - `privileges`: capabilities, the service user, `switch_user`;
//! - `signals`: the termination signals' mask at start-up;
//! - `limits`: RLIMIT_NOFILE and the descriptors in use;
//! - `splice`: the TCP relay's zero-copy pipes;
//! - `gso`: UDP segmentation offload (`send_segments`), and one datagram
//!   sent from several slices (`send_parts`).

mod cmsg;
mod gso;
mod limits;
mod privileges;
mod signals;
mod socket;
mod splice;

pub use cmsg::{
    orig_dst_from_cmsgs, recv_with_orig_dst, CmsgError, Datagram, RecvError, CMSG_SPACE,
};
pub use gso::{segments_unsupported, send_parts, send_segments};
pub use limits::{nofile_limit, open_descriptors, raise_nofile_limit};
pub use privileges::{
    ambient_caps, bounding_caps, find_account, get_caps, has_cap_net_admin,
    has_cap_net_bind_service, lookup_account, set_ambient_caps, set_caps, switch_user,
    thread_count, unprivileged_port_start, Account, CapSet, Caps, PrivilegeError, UserSpec, PASSWD,
};
pub use signals::{block_termination_signals, unblock_termination_signals};
pub use socket::{
    is_local_address, normalize, original_dst, outbound_tcp_socket, outbound_udp_socket, peek,
    reply_socket, service_udp_socket, set_mark, set_reset_on_close, shutdown_write,
    sockaddr_in6_to_std, sockaddr_in_to_std, tcp_listener, to_v6, udp_listener, ListenOptions,
};
pub use splice::Pipe;
