"""The documentation site: pages generated from the catalog at build time.

``mkdocs.yml`` runs ``tools/site/gen_pages.py`` through mkdocs-gen-files; the
page texts come from ``tools.site.pages`` so they can be tested without MkDocs.
"""
