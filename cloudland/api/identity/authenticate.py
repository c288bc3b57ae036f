"""``POST /v3/auth/tokens`` request handling: who is asking (methods) and for what (scope)."""

from __future__ import annotations

from typing import Any

from cloudland.api.errors import ApiError, bad_request, unauthorized
from cloudland.api.identity.service import IdentityService
from cloudland.api.identity.store import DomainInfo, UserInfo
from cloudland.api.identity.tokens import IssuedToken, TokenPayload

_MALFORMED = ("The server could not comply with the request since it is either malformed or "
              "otherwise incorrect. The client is assumed to be in error.")


def malformed(what: str) -> ApiError:
    return bad_request(f"Invalid input for field '{what}'. {_MALFORMED}")


def _obj(parent: dict[str, Any], key: str, where: str, required: bool = True) -> dict[str, Any]:
    value = parent.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"Expecting to find {key} in {where}. {_MALFORMED}")
    return value


def _str(parent: dict[str, Any], key: str, where: str) -> str | None:
    value = parent.get(key)
    if value is not None and not isinstance(value, str):
        raise malformed(f"{where}.{key}")
    return value


async def _domain_ref(svc: IdentityService, ref: dict[str, Any], where: str) -> DomainInfo:
    domain_id, name = _str(ref, "id", where), _str(ref, "name", where)
    if domain_id:
        domain = await svc.store.domain(domain_id)
    elif name:
        domain = await svc.store.domain_by_name(name)
    else:
        raise malformed(f"{where}.id")
    if domain is None or not domain.enabled:
        raise unauthorized()
    return domain


async def _password_user(svc: IdentityService, method: dict[str, Any]) -> UserInfo:
    ref = _obj(method, "user", "password")
    password = ref.get("password")
    if not isinstance(password, str):
        raise malformed("password.user.password")
    user_id, name = _str(ref, "id", "user"), _str(ref, "name", "user")
    if user_id:
        user = await svc.store.user(user_id)
    elif name:
        domain = await _domain_ref(svc, _obj(ref, "domain", "user"), "user.domain")
        user = await svc.store.user_by_name(name, domain.id)
    else:
        raise malformed("password.user.id")
    if user is None or not user.enabled:
        raise unauthorized()
    if not await svc.passwords.verify(user.id, user.password_hash, password):
        raise unauthorized()
    return user


async def _scope(svc: IdentityService, auth: dict[str, Any]) -> tuple[str | None, str | None, bool]:
    """(project_id, domain_id, explicit) for the requested scope."""
    scope = auth.get("scope")
    if scope is None or scope == "unscoped":
        return None, None, scope == "unscoped"
    if not isinstance(scope, dict):
        raise malformed("scope")
    if "project" in scope:
        ref = _obj(scope, "project", "scope")
        project_id, name = _str(ref, "id", "project"), _str(ref, "name", "project")
        if not project_id:
            if not name:
                raise malformed("scope.project.id")
            domain = await _domain_ref(svc, _obj(ref, "domain", "project"), "project.domain")
            project = await svc.store.project_by_name(name, domain.id)
            if project is None:
                raise unauthorized()
            project_id = project.id
        return project_id, None, True
    if "domain" in scope:
        domain = await _domain_ref(svc, _obj(scope, "domain", "scope"), "scope.domain")
        return None, domain.id, True
    if "system" in scope:
        raise unauthorized("System-scoped tokens are not supported.")
    raise malformed("scope")


async def authenticate(svc: IdentityService, body: Any, header_token: str | None) -> IssuedToken:
    auth = _obj(body, "auth", "request body") if isinstance(body, dict) else None
    if auth is None:
        raise bad_request(f"Expecting to find auth in request body. {_MALFORMED}")
    ident = _obj(auth, "identity", "auth")
    methods = ident.get("methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise malformed("identity.methods")
    user_id: str | None = None
    previous: TokenPayload | None = None
    if "password" in methods:
        user_id = (await _password_user(svc, _obj(ident, "password", "identity"))).id
    if "token" in methods:
        token_id = _obj(ident, "token", "identity", required=False).get("id") or header_token
        if not isinstance(token_id, str):
            raise malformed("identity.token.id")
        previous, _ = await svc.tokens.inspect(token_id)
        if user_id is not None and previous.user_id != user_id:
            raise unauthorized()
        user_id = previous.user_id
    unknown = set(methods) - {"password", "token"}
    if unknown or user_id is None:
        raise unauthorized(f"Unsupported authentication method: {', '.join(sorted(unknown))}"
                           if unknown else "The request you have made requires authentication.")
    project_id, domain_id, explicit = await _scope(svc, auth)
    all_methods = list(methods) + (list(previous.methods) if previous else [])
    expires = previous.expires_at if previous else None
    parent_audit = previous.audit_ids[-1] if previous else None
    if not explicit:
        # As Keystone: no scope means the default project, if the user may use it.
        user = await svc.store.user(user_id)
        if user is not None and user.default_project_id:
            try:
                return await svc.tokens.issue(user_id, all_methods, project_id=user.default_project_id,
                                              expires_at=expires, parent_audit_id=parent_audit)
            except ApiError:
                pass
    return await svc.tokens.issue(user_id, all_methods, project_id=project_id, domain_id=domain_id,
                                  expires_at=expires, parent_audit_id=parent_audit)
