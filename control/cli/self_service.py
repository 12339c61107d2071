"""``me``, ``opt-out``, ``opt-in`` and ``dashboard``: what anyone may do for themselves.

An employee sees whether capture is off on their own laptops and may opt out; anyone
with an identity may open the web dashboard in their own name and role.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from killswitch.v1 import killswitch_pb2 as pb

from control.cli.options import add_command
from control.cli.output import hold_kind_name
from control.cli.output import mode_name
from control.cli.output import print_json
from control.client import OperatorClient
from control.wire import iso


def laptop_json(laptop: pb.Laptop) -> dict[str, Any]:
    return {
        "agent_id": laptop.agent_id,
        "mode": mode_name(laptop.mode),
        "state": laptop.state,
        "connected": laptop.connected,
        "last_seen": iso(laptop.last_seen),
        "opted_out": laptop.opted_out,
        "holds": [{"kind": hold_kind_name(h.kind), "reason": h.reason} for h in laptop.holds],
    }


def cmd_me(args: argparse.Namespace, client: OperatorClient) -> int:
    laptops = client.list_my_laptops(pb.ListMyLaptopsRequest()).laptops
    if args.json:
        print_json([laptop_json(laptop) for laptop in laptops])
        return 0
    if not laptops:
        print("no laptop is registered to you (label owner=<your name>)")
        return 0
    for laptop in laptops:
        capture = "OFF" if laptop.mode == pb.MODE_PAUSED else "allowed"
        print(
            f"{laptop.agent_id}: capture {capture} ({laptop.state})"
            + (", opted out" if laptop.opted_out else "")
        )
        for hold in laptop.holds:
            print(f"  paused because: {hold.reason}")
    return 0


def cmd_opt_out(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.opt_out(pb.OptOutRequest(agent_id=args.agent_id, reason=args.reason or ""))
    print(
        f"{args.agent_id} opted out (hold {response.hold.id}, epoch {response.epoch});"
        " only you can opt back in"
    )
    return 0


def cmd_opt_in(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.opt_in(pb.OptInRequest(agent_id=args.agent_id))
    print(
        f"{args.agent_id} opted back in (hold {response.hold.id} lifted at epoch {response.epoch});"
        " other holds may still pause it"
    )
    return 0


def cmd_dashboard(args: argparse.Namespace, client: OperatorClient) -> int:
    """A one-time login link for the web dashboard, in this identity's name and role."""
    response = client.create_dashboard_session(pb.CreateDashboardSessionRequest())
    print(response.login_url)
    sys.stderr.write(
        f"open this link in a browser before {iso(response.expires_at)}; it works once."
        " Your session lasts 12 hours or until you log out.\n"
    )
    return 0


def add_commands(sub: Any) -> None:
    me = add_command(sub, "me", "your own laptops: is capture off?", cmd_me)
    me.add_argument("--json", action="store_true")
    opt_out = add_command(
        sub, "opt-out", "stop capture on your laptop until you opt in", cmd_opt_out
    )
    opt_out.add_argument("agent_id", metavar="LAPTOP_ID")
    opt_out.add_argument("--reason")
    opt_in = add_command(sub, "opt-in", "lift your own opt-out", cmd_opt_in)
    opt_in.add_argument("agent_id", metavar="LAPTOP_ID")
    add_command(
        sub, "dashboard", "print a one-time login link for the web dashboard", cmd_dashboard
    )
