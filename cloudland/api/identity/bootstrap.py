"""First-run identity: the Default domain, the standard roles, admin and demo accounts.

Idempotent: existing rows are kept (a password is never reset); generated passwords are
stored in ``<keys_dir>/admin-password`` and ``demo-password`` (mode 0600).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cloudland.api.identity.passwords import hash_password_async
from cloudland.config import Config
from cloudland.db.models import Domain, Project, Role, RoleAssignment, User

DEFAULT_DOMAIN_ID = "default"
DEFAULT_DOMAIN_NAME = "Default"
STANDARD_ROLES = ("admin", "member", "reader")


@dataclass(frozen=True)
class BootstrapCredentials:
    admin_password: str
    demo_password: str
    admin_user_id: str
    demo_user_id: str
    admin_project_id: str
    demo_project_id: str


def _password_file(keys_dir: Path, name: str) -> str:
    """Read the stored password, or generate and store one (mode 0600)."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = keys_dir / name
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(18)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race
        return path.read_text().strip()
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    return value


async def _role(s: AsyncSession, name: str) -> Role:
    role = (await s.execute(select(Role).where(Role.name == name))).scalar_one_or_none()
    if role is None:
        role = Role(name=name)
        s.add(role)
        await s.flush()
    return role


async def _project(s: AsyncSession, name: str, description: str) -> Project:
    stmt = select(Project).where(Project.name == name, Project.domain_id == DEFAULT_DOMAIN_ID)
    project = (await s.execute(stmt)).scalar_one_or_none()
    if project is None:
        project = Project(name=name, domain_id=DEFAULT_DOMAIN_ID, description=description)
        s.add(project)
        await s.flush()
    return project


async def _user(s: AsyncSession, name: str, password: str) -> User:
    stmt = select(User).where(User.name == name, User.domain_id == DEFAULT_DOMAIN_ID)
    user = (await s.execute(stmt)).scalar_one_or_none()
    if user is None:
        # Like keystone-manage bootstrap: no default project, so an unscoped request stays unscoped.
        user = User(name=name, domain_id=DEFAULT_DOMAIN_ID, password_hash=await hash_password_async(password))
        s.add(user)
        await s.flush()
    return user


async def _grant(s: AsyncSession, user: User, project: Project, role: Role) -> None:
    key = {"user_id": user.id, "target_type": "project", "target_id": project.id, "role_id": role.id}
    if await s.get(RoleAssignment, key) is None:
        s.add(RoleAssignment(**key))


async def bootstrap_identity(sessionmaker: async_sessionmaker[AsyncSession],
                             config: Config) -> BootstrapCredentials:
    ident = config.identity
    admin_password = _password_file(config.keys_dir, "admin-password")
    demo_password = _password_file(config.keys_dir, "demo-password")
    async with sessionmaker() as s, s.begin():
        if await s.get(Domain, DEFAULT_DOMAIN_ID) is None:
            s.add(Domain(id=DEFAULT_DOMAIN_ID, name=DEFAULT_DOMAIN_NAME,
                         description="The default domain"))
            await s.flush()
        roles = {name: await _role(s, name) for name in STANDARD_ROLES}
        admin_project = await _project(s, ident.admin_project, "Bootstrap project for administrators")
        demo_project = await _project(s, ident.demo_project, "Demo project")
        admin = await _user(s, ident.admin_user, admin_password)
        demo = await _user(s, ident.demo_user, demo_password)
        await _grant(s, admin, admin_project, roles["admin"])
        await _grant(s, demo, demo_project, roles["member"])
    return BootstrapCredentials(admin_password, demo_password, admin.id, demo.id,
                                admin_project.id, demo_project.id)
