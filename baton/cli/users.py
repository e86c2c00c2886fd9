"""``baton users …``: create users and issue, list and revoke their API keys (needs the gateway's admin key).

The admin key is BATON_GATEWAY_ADMIN_KEY, else BATON_HOME/admin.key (``baton up`` writes it). A key's secret is
printed once, when it is issued; the gateway keeps only its hash.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from baton.clients.gateway import GatewayClient, default_admin_key

DEFAULT_GATEWAY = os.environ.get("BATON_GATEWAY_URL", "http://127.0.0.1:8000")


def _admin(args: argparse.Namespace) -> GatewayClient:
    key = default_admin_key()
    if key is None:
        sys.exit(
            "baton users: no admin key; set BATON_GATEWAY_ADMIN_KEY, or point BATON_HOME at the folder where "
            "`baton up` wrote admin.key"
        )
    return GatewayClient(args.gateway, api_key=key, timeout_s=30)


def _when(unix_s: float | None) -> str:
    if unix_s is None:
        return "-"
    return datetime.datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M")


def _print_new_key(issued: dict[str, object]) -> None:
    print(f"API key {issued['id']} for {issued['user']} (tenant {issued['tenant']}); shown once, store it now:")
    print(f"  {issued['key']}")
    print("use it: export BATON_API_KEY=<key>   (OpenAI clients: api_key=<key>)")


def create(args: argparse.Namespace) -> None:
    with _admin(args) as admin:
        user = admin.create_user(args.name, tenant=args.tenant)
        print(f"user {user['name']} created (tenant {user['tenant']})")
        _print_new_key(admin.create_key(args.name, label=args.label))


def keys(args: argparse.Namespace) -> None:
    with _admin(args) as admin:
        if args.list:
            listed = admin.keys(args.name)["keys"]
            print(f"{'id':<18}{'prefix':<12}{'created':<18}{'last used':<18}{'state':<26}label")
            for key in listed:
                state = "active" if key["active"] else f"revoked {_when(key['revoked_at'])}"
                print(f"{key['id']:<18}{key['prefix'] + '…':<12}{_when(key['created_at']):<18}"
                      f"{_when(key['last_used_at']):<18}{state:<26}{key['label']}")  # fmt: skip
            if not listed:
                print(f"(no keys; issue one with: baton users keys {args.name})")
            return
        _print_new_key(admin.create_key(args.name, label=args.label))


def revoke(args: argparse.Namespace) -> None:
    with _admin(args) as admin:
        key = admin.revoke_key(args.name, args.key_id)
    print(f"revoked {key['id']} ({key['prefix']}…) of {key['user']} at {_when(key['revoked_at'])}")


def delete(args: argparse.Namespace) -> None:
    with _admin(args) as admin:
        deleted = admin.delete_user(args.name)
    print(f"deleted user {args.name} and its {deleted['keys_deleted']} keys (the tenant's documents stay)")


def list_users(args: argparse.Namespace) -> None:
    with _admin(args) as admin:
        listed = admin.users()
    print(f"{'user':<24}{'tenant':<24}{'active keys':>12}  created")
    for user in listed["users"]:
        print(f"{user['name']:<24}{user['tenant']:<24}{user['active_keys']:>12}  {_when(user['created_at'])}")
    if not listed["users"]:
        print("(no users; create one with: baton users create NAME)")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "users",
        help="users and their API keys (admin key: BATON_GATEWAY_ADMIN_KEY or BATON_HOME/admin.key)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, help="gateway URL [env BATON_GATEWAY_URL]")
    verbs = parser.add_subparsers(dest="what", required=True, metavar="VERB")

    verb = verbs.add_parser("create", help="create a user (bound to a tenant) and print its first API key")
    verb.add_argument("name")
    verb.add_argument("--tenant", default=None, help="tenant its keys act for [the user's name]; users may share one")
    verb.add_argument("--label", default="", help="what the key is for, e.g. laptop")
    verb.set_defaults(run=create)

    verb = verbs.add_parser("keys", help="issue a new API key for a user and print it (--list: list its keys)")
    verb.add_argument("name")
    verb.add_argument("--list", action="store_true", help="list the user's keys instead of issuing one")
    verb.add_argument("--label", default="", help="what the key is for, e.g. laptop")
    verb.set_defaults(run=keys)

    verb = verbs.add_parser("list", help="list users, their tenants and active keys")
    verb.set_defaults(run=list_users)

    verb = verbs.add_parser("revoke", help="revoke one of a user's keys (it stops working at once)")
    verb.add_argument("name")
    verb.add_argument("key_id", help="the key's id (key_…), from: baton users keys NAME --list")
    verb.set_defaults(run=revoke)

    verb = verbs.add_parser("delete", help="delete a user and its keys (its tenant's documents stay)")
    verb.add_argument("name")
    verb.set_defaults(run=delete)
