"""The domains of `facemeta serve`'s gallery over HTTP (facemeta.gallery.domains): GET /api/domains lists them,
POST /api/domains adds unlabelled photos to one (created if new), DELETE /api/domains/{name} (or
DELETE /api/domains?name=...) removes one. The service's verify, identify and enroll take the domain of each
photo (``domain_a``, ``domain_b``, ``domain``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, Query, Response, UploadFile

from facemeta.errors import GalleryError, one_line
from facemeta.serve.service import ApiError


def list_domains(service) -> dict:
    """Every domain of the gallery (photos, enrolled embeddings, stability, threshold) and what the default is."""
    from facemeta.gallery.domains import DEFAULT_DESCRIPTION
    from facemeta.gallery.domains import list_domains as listed

    g = service._gallery()
    if g is not None:
        g.refresh()
    found = listed(g) if g is not None else []
    return {"default": DEFAULT_DESCRIPTION, "domains": [d.to_dict() for d in found], "count": len(found)}


def add_photos(service, name: str, images: list) -> dict:
    """Count unlabelled photos into a domain (created, with the gallery, if new): added, already counted,
    skipped [{file, reason}], a warning when it rests on few photos, and the domain as it now is."""
    from facemeta.gallery.domains import check_domain_name

    service._writable()
    try:
        name = check_domain_name(name)
    except GalleryError as exc:
        raise ApiError(422, one_line(exc, limit=1000)) from None
    if not images:
        raise ApiError(422, "give at least one image")
    with service.uploads(images) as paths, service._write:
        tmp = paths[0].parent
        fr = service._writer()
        try:
            with service.inference():
                result = fr.add_domain(name, paths, sources=[f"upload:{p.name}" for p in paths])
        finally:
            fr.close()
        skipped = [{"file": Path(p).name, "reason": service.scrub(why, tmp)} for p, why in result.skipped]
    return {"name": name, "added": result.added, "already": result.already, "skipped": skipped,
            "warning": result.warning, "domain": result.domain.to_dict()}


def remove(service, name: str, force: bool = False) -> dict:
    """Remove a domain: 404 if unknown; 409 while people are enrolled under it unless ``force``."""
    service._writable()
    with service._write:
        fr = service._writer()
        try:
            if not fr.exists() or name not in {d.name for d in fr.domains()}:
                raise ApiError(404, f"no domain named {name[:80]!r} in the gallery")
            moved = fr.remove_domain(name, force=force)
        finally:
            fr.close()
    return {"removed": name, "moved_to_default": moved}


def add_domain_routes(app: FastAPI, service, key_doc: list) -> None:
    """GET, POST and DELETE /api/domains."""
    @app.get("/api/domains", tags=["domains"], dependencies=key_doc)
    def domains() -> dict:
        """Every domain of the gallery: photos behind it, enrolled embeddings, stability, calibrated threshold."""
        return list_domains(service)

    @app.post("/api/domains", tags=["domains"], dependencies=key_doc, status_code=201)
    def add(response: Response, name: Annotated[str, Form(description="the domain's name (e.g. door-2, sketch)")],
            images: Annotated[list[UploadFile], File(description="unlabelled photos of that domain, any people")]
            ) -> dict:
        """Add unlabelled photos to a domain (created if new) and re-estimate its statistics; 200 when every
        photo was counted already. People enrolled under it are normalised again."""
        out = add_photos(service, name, [(f.filename, f.file) for f in images])
        if not out["added"]:
            response.status_code = 200
        return out

    @app.delete("/api/domains", tags=["domains"], dependencies=key_doc)
    def remove_by_query(name: Annotated[str, Query(description="the domain's name")],
                        force: Annotated[bool, Query(description="even with people enrolled under it")] = False) -> dict:
        """Remove a domain (people enrolled under it stay, unnormalised, only with force)."""
        return remove(service, name, force)

    @app.delete("/api/domains/{name:path}", tags=["domains"], dependencies=key_doc)
    def remove_by_path(name: str, force: bool = False) -> dict:
        """Remove a domain; the same as DELETE /api/domains?name=NAME."""
        return remove(service, name, force)
